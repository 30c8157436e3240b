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

{{/* The model the bridge targets: bridge.model or the first model. */}}
{{- define "kcp.bridgeModel" -}}
{{- default (index .Values.models 0).name .Values.bridge.model }}
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
{{- with $m.autoscaling }}
{{- if and (not $knative) (has .scaleMetric (list "concurrency" "rps")) }}
{{- fail (printf "models[%d] (%s): autoscaling.scaleMetric %q needs kserve.deploymentMode=Knative; Standard mode scales on cpu or memory" $i $m.name .scaleMetric) }}
{{- end }}
{{- end }}
{{- end }}
{{- if .Values.bridge.enabled }}
{{- if and .Values.bridge.model (not (has .Values.bridge.model $names)) }}
{{- fail (printf "bridge.model: %q is not the name of an entry in models (%s)" .Values.bridge.model (join ", " $names)) }}
{{- end }}
{{- $a := .Values.bridge.kafka.auth }}
{{- if and (or $a.sasl $a.tls $a.clientCert) (not $a.existingSecret) }}
{{- fail "bridge.kafka.auth: sasl, tls or clientCert is on but auth.existingSecret names no Secret to read the credentials from" }}
{{- end }}
{{- if and $a.clientCert (not $a.tls) }}
{{- fail "bridge.kafka.auth.clientCert needs bridge.kafka.auth.tls=true (a client certificate is only sent over TLS)" }}
{{- end }}
{{- if eq .Values.bridge.mode "knative" }}
{{- if .Values.apiKey.enabled }}
{{- fail "bridge.mode=knative: a KafkaSource cannot send the API key header, so requests would be refused with 401; set apiKey.enabled=false (networkPolicy.enabled then confines the predictors to the KafkaSource dispatcher) or use bridge.mode=deployment" }}
{{- end }}
{{- if and $knative (eq .Values.kserve.knativeProtocol "grpc") }}
{{- fail "bridge.mode=knative delivers CloudEvents over HTTP: it needs the REST port, but kserve.knativeProtocol=grpc exposes only gRPC" }}
{{- end }}
{{- else }}
{{- if and $knative (ne .Values.kserve.knativeProtocol .Values.bridge.deployment.protocol) }}
{{- fail (printf "bridge.deployment.protocol=%s, but in Knative mode the InferenceService serves only %s (kserve.knativeProtocol)" .Values.bridge.deployment.protocol .Values.kserve.knativeProtocol) }}
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
