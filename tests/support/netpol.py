"""What a set of NetworkPolicies lets through, by the rules of networking.k8s.io/v1, for asserting on the chart.

No cluster here enforces NetworkPolicies, so the tests evaluate the rendered objects instead: a pod is isolated in
a direction once any policy selecting it lists that direction in ``policyTypes``; then a connection passes if some
rule of some such policy matches both the peer (pod and namespace labels, or IP address) and the port.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Pod:
    """A pod (labels, namespace and its namespace's labels) or, with ``ip`` set, an address outside the cluster."""

    namespace: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    namespace_labels: dict[str, str] = field(default_factory=dict)
    ip: str = ""

    def ns_labels(self) -> dict[str, str]:
        return {"kubernetes.io/metadata.name": self.namespace, **self.namespace_labels}


def selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A LabelSelector against labels (matchLabels and matchExpressions; an empty selector selects everything)."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def _peer_matches(peer: dict[str, Any], other: Pod, policy_namespace: str) -> bool:
    if "ipBlock" in peer:
        if not other.ip:
            return False  # pod traffic is judged by selectors (ipBlock is meant for addresses outside the cluster)
        address = ipaddress.ip_address(other.ip)
        block = peer["ipBlock"]
        net = ipaddress.ip_network(block["cidr"])
        return address.version == net.version and address in net and not any(
            address.version == ipaddress.ip_network(e).version and address in ipaddress.ip_network(e)
            for e in block.get("except") or [])
    if other.ip:
        return False
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], other.ns_labels()):
            return False
    elif other.namespace != policy_namespace:
        return False
    return selects(peer.get("podSelector"), other.labels)


def _port_matches(ports: list[dict[str, Any]] | None, port: int, protocol: str) -> bool:
    if not ports:
        return True
    for p in ports:
        if p.get("protocol", "TCP") != protocol:
            continue
        if "port" not in p:
            return True
        start = p["port"]
        if isinstance(start, int) and start <= port <= p.get("endPort", start):
            return True
    return False


def allowed(policies: list[dict[str, Any]], pod: Pod, other: Pod, port: int, *, direction: str,
            protocol: str = "TCP") -> bool:
    """Whether ``pod`` accepts (``direction="Ingress"``) from, or may open (``"Egress"``) to, ``other`` on ``port``."""
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    isolating = [p for p in policies if p["metadata"].get("namespace") == pod.namespace
                 and selects(p["spec"]["podSelector"], pod.labels)
                 and direction in p["spec"].get("policyTypes", ["Ingress"])]
    if not isolating:
        return True
    for policy in isolating:
        for rule in policy["spec"].get(key) or []:
            peers = rule.get(peers_key)
            if (not peers or any(_peer_matches(peer, other, policy["metadata"]["namespace"]) for peer in peers)) \
                    and _port_matches(rule.get("ports"), port, protocol):
                return True
    return False
