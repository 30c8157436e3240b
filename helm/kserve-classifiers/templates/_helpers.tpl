{{/*
Naming, labels and the pieces several templates share.
*/}}

{{- define "kcp.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kcp.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kcp.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels: stable across upgrades. Call with (dict "ctx" $ "component" "bridge"). */}}
{{- define "kcp.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kcp.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end }}

{{/* All standard labels. Call with (dict "ctx" $ "component" "predictor"). */}}
{{- define "kcp.labels" -}}
helm.sh/chart: {{ include "kcp.chart" .ctx }}
{{ include "kcp.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: kserve-classifiers
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* "<registry>/<repository>:<tag>", or "<registry>/<repository>@<digest>" when the image has a digest.
Call with (dict "ctx" $ "image" .Values.predictor.image) */}}
{{- define "kcp.image" -}}
{{- $repository := .image.repository -}}
{{- if .ctx.Values.image.registry -}}
{{- $repository = printf "%s/%s" (trimSuffix "/" .ctx.Values.image.registry) .image.repository -}}
{{- end -}}
{{- if .image.digest -}}
{{- printf "%s@%s" $repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repository (default .ctx.Chart.AppVersion .ctx.Values.image.tag) -}}
{{- end -}}
{{- end }}

{{/* API key Secret name and key. */}}
{{- define "kcp.apiKeySecretName" -}}
{{- default (printf "%s-api-key" (include "kcp.fullname" .)) .Values.apiKey.existingSecret }}
{{- end }}

{{/* Feedback database: "" (SQLite on an emptyDir) or the Secret holding the URL. */}}
{{- define "kcp.feedbackSecretName" -}}
{{- if .Values.feedback.database.existingSecret }}
{{- .Values.feedback.database.existingSecret }}
{{- else if .Values.feedback.database.url }}
{{- printf "%s-feedback-db" (include "kcp.fullname" .) }}
{{- end }}
{{- end }}

{{/* The serving runtime of a model format. Call with (dict "ctx" $ "format" "sklearn"). */}}
{{- define "kcp.runtimeName" -}}
{{- printf "%s-%s" (include "kcp.fullname" .ctx | trunc 54 | trimSuffix "-") .format }}
{{- end }}

{{- define "kcp.runtimeKind" -}}
{{- ternary "ClusterServingRuntime" "ServingRuntime" (eq .Values.runtimes.scope "Cluster") }}
{{- end }}

{{/* The first model whose format is in `formats`, else the first model. Call with (dict "ctx" $ "formats" (list ...)). */}}
{{- define "kcp.firstModelOf" -}}
{{- $found := "" }}
{{- range $f := .formats }}
{{- range $.ctx.Values.models }}
{{- if and (not $found) (eq .format $f) }}{{ $found = .name }}{{ end }}
{{- end }}
{{- end }}
{{- default (index .ctx.Values.models 0).name $found }}
{{- end }}

{{- define "kcp.bridgeRowModel" -}}
{{- default (include "kcp.firstModelOf" (dict "ctx" . "formats" (list "sklearn" "katonic"))) .Values.bridge.defaultRowModel }}
{{- end }}

{{- define "kcp.bridgeImageModel" -}}
{{- default (include "kcp.firstModelOf" (dict "ctx" . "formats" (list "keras"))) .Values.bridge.defaultImageModel }}
{{- end }}

{{/* Whether a model can run more than one pod at once: "true" or "". */}}
{{- define "kcp.multiPod" -}}
{{- $m := .model }}
{{- $knative := eq .ctx.Values.kserve.deploymentMode "Knative" }}
{{- if or (gt (int (default 1 $m.minReplicas)) 1) (gt (int (default 1 $m.maxReplicas)) 1) (and $knative (not (hasKey $m "maxReplicas"))) $m.canary }}true{{ end }}
{{- end }}

{{/* The Kafka security protocol implied by bridge.kafka.auth. */}}
{{- define "kcp.kafkaProtocol" -}}
{{- $a := .Values.bridge.kafka.auth -}}
{{- if and $a.sasl $a.tls }}SASL_SSL{{ else if $a.sasl }}SASL_PLAINTEXT{{ else if $a.tls }}SSL{{ else }}PLAINTEXT{{ end }}
{{- end }}

{{/*
Checks across values that a JSON schema cannot express; `fail` stops install/template with the message.
*/}}
{{- define "kcp.validate" -}}
{{- $knative := eq .Values.kserve.deploymentMode "Knative" }}
{{- $names := list }}
{{- range $i, $m := .Values.models }}
{{- if has $m.name $names }}
{{- fail (printf "models[%d].name: %q is listed twice; each model is one InferenceService and needs a unique name" $i $m.name) }}
{{- end }}
{{- $names = append $names $m.name }}
{{- if and (hasKey $m "minReplicas") (hasKey $m "maxReplicas") (gt (int $m.minReplicas) (int $m.maxReplicas)) }}
{{- fail (printf "models[%d] (%s): minReplicas (%d) is greater than maxReplicas (%d)" $i $m.name (int $m.minReplicas) (int $m.maxReplicas)) }}
{{- end }}
{{- if and (not $knative) (hasKey $m "minReplicas") (eq (int $m.minReplicas) 0) }}
{{- fail (printf "models[%d] (%s): minReplicas 0 (scale to zero) needs kserve.deploymentMode=Knative" $i $m.name) }}
{{- end }}
{{- if not (index $.Values.runtimes $m.format).enabled }}
{{- fail (printf "models[%d] (%s): format %s, but runtimes.%s.enabled is false" $i $m.name $m.format $m.format) }}
{{- end }}
{{- if and $m.canary (not $knative) }}
{{- fail (printf "models[%d] (%s): a canary (canaryTrafficPercent) needs kserve.deploymentMode=Knative; KServe splits traffic between revisions only there" $i $m.name) }}
{{- end }}
{{- if and $m.canary (not $m.version) }}
{{- fail (printf "models[%d] (%s): canary needs the primary's version (models[%d].version) to compare the two" $i $m.name $i) }}
{{- end }}
{{- if and $m.canary $m.version (eq (toString $m.version) (toString $m.canary.version)) }}
{{- fail (printf "models[%d] (%s): canary.version %q is the primary's version; a canary is version N+1" $i $m.name (toString $m.version)) }}
{{- end }}
{{- if and (include "kcp.multiPod" (dict "ctx" $ "model" $m)) (not (include "kcp.feedbackSecretName" $)) (not $.Values.feedback.database.allowSqliteWithReplicas) }}
{{- fail (printf "models[%d] (%s) can run more than one pod (maxReplicas > 1, Knative without maxReplicas, or a canary), but the feedback store is SQLite inside each pod: feedback would split across pods and be lost with them. Set feedback.database.url or existingSecret (PostgreSQL), maxReplicas: 1, or feedback.database.allowSqliteWithReplicas=true" $i $m.name) }}
{{- end }}
{{- with $m.autoscaling }}
{{- if and (not $knative) (has .scaleMetric (list "concurrency" "rps")) }}
{{- fail (printf "models[%d] (%s): autoscaling.scaleMetric %q needs kserve.deploymentMode=Knative; Standard mode scales on cpu or memory" $i $m.name .scaleMetric) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and (not .Values.apiKey.enabled) (not .Values.networkPolicy.enabled) }}
{{- fail "apiKey.enabled=false with networkPolicy.enabled=false leaves the predictors open to every pod of the cluster; enable one of them" }}
{{- end }}
{{- if .Values.bridge.enabled }}
{{- range $key := list "model" "defaultRowModel" "defaultImageModel" }}
{{- $v := index $.Values.bridge $key }}
{{- if and $v (not (has $v $names)) }}
{{- fail (printf "bridge.%s: %q is not the name of an entry in models (%s)" $key $v (join ", " $names)) }}
{{- end }}
{{- end }}
{{- $a := .Values.bridge.kafka.auth }}
{{- if and (or $a.sasl $a.tls $a.clientCert) (not $a.existingSecret) }}
{{- fail "bridge.kafka.auth: sasl, tls or clientCert is on but auth.existingSecret names no Secret to read the credentials from" }}
{{- end }}
{{- if and $a.clientCert (not $a.tls) }}
{{- fail "bridge.kafka.auth.clientCert needs bridge.kafka.auth.tls=true (a client certificate is only sent over TLS)" }}
{{- end }}
{{- if and $knative (ne .Values.kserve.knativeProtocol .Values.bridge.deployment.protocol) }}
{{- fail (printf "bridge.deployment.protocol=%s, but in Knative mode the InferenceService serves only %s (kserve.knativeProtocol)" .Values.bridge.deployment.protocol .Values.kserve.knativeProtocol) }}
{{- end }}
{{- if eq .Values.bridge.mode "knative" }}
{{- $kn := .Values.bridge.knative }}
{{- if not .Values.networkPolicy.enabled }}
{{- fail "bridge.mode=knative: the bridge's CloudEvents receiver calls the models with the API key for whoever posts to it; networkPolicy.enabled=true confines it to the KafkaSource dispatcher (networkPolicy.ingress.kafkaSourceDispatcher)" }}
{{- end }}
{{- /* The bridge must answer a delivery before the KafkaSource gives up on it: a timed-out attempt is retried
       while the first one may still write its result (a duplicate). Checked for the PT<n>S / PT<n>M forms. */}}
{{- $t := regexFind "^PT[0-9]+[SM]$" (toString $kn.timeout) }}
{{- if $t }}
{{- $seconds := mul (atoi (regexFind "[0-9]+" $t)) (ternary 60 1 (hasSuffix "M" $t)) }}
{{- if le (int $seconds) (int (add $kn.messageDeadlineSeconds $kn.deadLetterTimeoutSeconds)) }}
{{- fail (printf "bridge.knative.timeout=%s must exceed messageDeadlineSeconds + deadLetterTimeoutSeconds (%d s): the bridge answers a delivery within that time, and a KafkaSource that gives up first delivers the record again while the first attempt may still publish its result" $kn.timeout (int (add $kn.messageDeadlineSeconds $kn.deadLetterTimeoutSeconds))) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* NetworkPolicy peers for "the internet": every IPv4 and IPv6 address except networkPolicy.egress's private ranges. */}}
{{- define "kcp.publicInternet" -}}
- ipBlock:
    cidr: 0.0.0.0/0
    except:
      {{- toYaml .Values.networkPolicy.egress.privateRanges | nindent 6 }}
- ipBlock:
    cidr: ::/0
    except:
      {{- toYaml .Values.networkPolicy.egress.privateRangesV6 | nindent 6 }}
{{- end }}

{{/* A PromQL selector: prometheusRule.matchers plus `extra`. Call with (dict "ctx" $ "extra" "model=\"iris\""). */}}
{{- define "kcp.promSel" -}}
{{- $parts := list }}
{{- with .ctx.Values.prometheusRule.matchers }}{{ $parts = append $parts . }}{{ end }}
{{- with .extra }}{{ $parts = append $parts . }}{{ end }}
{{- if $parts }}{{ printf "{%s}" (join ", " $parts) }}{{ end }}
{{- end }}

{{/* The feedback series alerts read: production feedback only, never what was typed on the browser page. */}}
{{- define "kcp.promFeedbackSel" -}}
{{- include "kcp.promSel" (dict "ctx" . "extra" "source!=\"ui\"") }}
{{- end }}

{{/* Feedback items judged correct (true label = predicted label) over a range, by `by`: the two label_replace
copies match under `and` only where both labels agree. `or ... * 0` keeps a window with no correct item at 0
rather than absent. Call with (dict "ctx" $ "range" "1h" "offset" "" "by" "model" "total" "<recorded total>"). */}}
{{- define "kcp.promCorrect" -}}
{{- $sel := include "kcp.promFeedbackSel" .ctx -}}
{{- $offset := "" }}{{ with .offset }}{{ $offset = printf " offset %s" . }}{{ end -}}
{{- $inc := printf "increase(classifier_feedback_total%s[%s]%s)" $sel .range $offset -}}
sum by ({{ .by }}) (label_replace({{ $inc }}, "label", "$1", "true_label", "(.*)") and label_replace({{ $inc }}, "label", "$1", "predicted_label", "(.*)")) or {{ .total }} * 0
{{- end }}
