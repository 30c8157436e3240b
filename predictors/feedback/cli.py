"""``python -m predictors.feedback``: read a model's feedback report and compare its versions.

``report`` prints the cumulative metrics and every model version side by side;
``compare`` prints accuracy and macro F1 per version with their 95 % intervals and the
verdict on the candidate (``better``, ``worse``, or ``undecided`` with n so far and n needed).
Both ask a running model server over REST (``GET /v2/models/{name}/feedback`` and
``.../feedback/compare``), so they read exactly what the API and the browser page show, from
any machine that can reach the server. The API key comes from ``--api-key`` or ``KCP_API_KEY``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any
from urllib.parse import quote

import httpx

EXIT_WORSE = 3
"""``compare --fail-if-worse`` exits with this when the candidate is worse with significance."""


def _get(args: argparse.Namespace, path: str, params: dict[str, str]) -> dict[str, Any]:
    headers = {"X-API-Key": args.api_key} if args.api_key else {}
    url = f"{args.url.rstrip('/')}/v2/models/{quote(args.model, safe='')}{path}"
    try:
        response = httpx.get(url, params={k: v for k, v in params.items() if v}, headers=headers,
                             timeout=args.timeout)
    except httpx.HTTPError as exc:
        raise SystemExit(f"error: cannot reach {args.url}: {exc}") from exc
    try:
        body = response.json()
    except ValueError:
        body = {"error": response.text[:300]}
    if response.status_code != 200:
        raise SystemExit(f"error: {response.status_code} {body.get('error', body)}")
    return body


def _number(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    lines = ["  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(line, widths,
                                                                                                 strict=True)))
             for line in [header, *rows]]
    return "\n".join(lines)


def format_report(report: dict[str, Any]) -> str:
    """The report as text: the totals, then one row per model version (oldest first)."""
    cumulative = report["cumulative"]
    scope = f"version {report['version']}" if report.get("version") else "all versions"
    lines = [f"model {report['model_name']} ({scope}; sources: {', '.join(report.get('sources', []))}): "
             f"{cumulative['count']} feedback, accuracy {_number(cumulative['accuracy'])}, "
             f"macro F1 {_number(cumulative['macro_avg']['f1'])} over {cumulative['macro_avg']['classes']} classes "
             f"present ({_number(cumulative['macro_avg_all_labels']['f1'])} over all "
             f"{cumulative['macro_avg_all_labels']['classes']} labels)"]
    versions = report.get("versions", [])
    if versions:
        lines += ["", "versions side by side:", _table(
            ["version", "count", "accuracy", "macro F1", "macro F1 (all labels)", "weighted F1"],
            [[v["version"] or "(unknown)", str(v["count"]), _number(v["accuracy"]), _number(v["macro_f1"]),
              _number(v["macro_f1_all_labels"]), _number(v["weighted_f1"])] for v in versions])]
    return "\n".join(lines)


def _interval(interval: dict[str, Any] | None) -> str:
    return "–" if interval is None else f"[{interval['low']:.3f}, {interval['high']:.3f}]"


def format_comparison(comparison: dict[str, Any]) -> str:
    """The comparison as text: per-version numbers with intervals, then the verdict and why."""
    rows = []
    for v in comparison["versions"]:
        role = ("baseline" if v["version"] == comparison["baseline"]["version"]
                else "candidate" if v["version"] == comparison["candidate"]["version"] else "")
        rows.append([v["version"] or "(unknown)", role, str(v["count"]), _number(v["accuracy"]),
                     _interval(v["accuracy_interval"]), _number(v["macro_f1"]), _interval(v["macro_f1_interval"])])
    needed = comparison["n_needed"]
    lines = [f"model {comparison['model_name']}: version {comparison['candidate']['version']} against "
             f"{comparison['baseline']['version']}", "",
             _table(["version", "role", "n", "accuracy", "95% (Wilson)", "macro F1", "95% (bootstrap)"], rows), "",
             f"verdict: {comparison['verdict']} ({comparison['reason']})",
             f"n so far: {comparison['n_so_far']}; n needed per version: {needed if needed is not None else '–'}"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m predictors.feedback", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from predictors.settings import ToolSettings

    tool = ToolSettings()
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=tool.server_url,
                        help="the model server's REST address (env KCP_SERVER_URL)")
    common.add_argument("--model", required=True, help="the model's name")
    common.add_argument("--api-key", default=tool.api_key, help="API key (env KCP_API_KEY)")
    common.add_argument("--source", default=None, help="count only these sources (comma-separated: api, ui)")
    common.add_argument("--exclude-source", default=None, help="leave these sources out (e.g. ui)")
    common.add_argument("--json", action="store_true", help="print the server's JSON answer instead of a table")
    common.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the server")
    sub = parser.add_subparsers(dest="command", required=True)
    report = sub.add_parser("report", parents=[common], help="metrics with every model version side by side")
    report.add_argument("--version", default=None, help="report on this model version only")
    compare = sub.add_parser("compare", parents=[common], help="compare two versions: better, worse or undecided")
    compare.add_argument("--baseline", default=None, help="the version to compare against (default: the one "
                                                          "before the candidate)")
    compare.add_argument("--candidate", default=None, help="the version judged (default: the one served now)")
    compare.add_argument("--fail-if-worse", action="store_true",
                         help=f"exit with {EXIT_WORSE} when the candidate is worse with significance")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    filters = {"source": args.source, "exclude_source": args.exclude_source}
    if args.command == "report":
        body = _get(args, "/feedback", {**filters, "version": args.version})
        print(json.dumps(body, indent=2) if args.json else format_report(body))
        return 0
    body = _get(args, "/feedback/compare", {**filters, "baseline": args.baseline, "candidate": args.candidate})
    print(json.dumps(body, indent=2) if args.json else format_comparison(body))
    return EXIT_WORSE if args.fail_if_worse and body["verdict"] == "worse" else 0


if __name__ == "__main__":
    sys.exit(main())
