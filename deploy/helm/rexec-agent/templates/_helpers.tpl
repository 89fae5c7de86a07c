{{/* Names. */}}
{{- define "rexec-agent.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "rexec-agent.fullname" -}}
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

{{- define "rexec-agent.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Kubernetes recommended labels. */}}
{{- define "rexec-agent.labels" -}}
helm.sh/chart: {{ include "rexec-agent.chart" . }}
{{ include "rexec-agent.selectorLabels" . }}
app.kubernetes.io/version: {{ (.Values.image.tag | default .Chart.AppVersion) | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/component: agent
app.kubernetes.io/part-of: rexec
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "rexec-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rexec-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "rexec-agent.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "rexec-agent.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "rexec-agent.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion -}}
{{- if hasPrefix "sha256:" $tag -}}
{{- printf "%s@%s" .Values.image.repository $tag -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end }}

{{/* The Secret the chart creates for values given inline (token.value, broker.url, redis.url). */}}
{{- define "rexec-agent.secretName" -}}
{{- include "rexec-agent.fullname" . }}
{{- end }}

{{- define "rexec-agent.hasInlineSecrets" -}}
{{- if or .Values.token.value .Values.broker.url .Values.redis.url }}true{{ end }}
{{- end }}

{{/*
A secretKeyRef for one setting: the chart's own Secret when the value is inline, else the
existing Secret. Arguments: (list $ <values block> <key in the chart's Secret> <what, for errors>).
*/}}
{{- define "rexec-agent.secretKeyRef" -}}
{{- $root := index . 0 }}
{{- $block := index . 1 }}
{{- $key := index . 2 }}
{{- $what := index . 3 }}
{{- $inline := or $block.value $block.url }}
{{- if $inline }}
secretKeyRef:
  name: {{ include "rexec-agent.secretName" $root }}
  key: {{ $key }}
{{- else }}
{{- $existing := $block.existingSecret | default dict }}
{{- if not (and $existing.name $existing.key) }}
{{- fail (printf "%s: set %s.existingSecret.name and .key (a Secret holding it), or the value itself" $what $what) }}
{{- end }}
secretKeyRef:
  name: {{ $existing.name }}
  key: {{ $existing.key }}
{{- end }}
{{- end }}

{{/*
terminationGracePeriodSeconds: drainTimeout + terminationGraceMargin, rounded up, or the
override, which must be above drainTimeout.
*/}}
{{- define "rexec-agent.terminationGracePeriodSeconds" -}}
{{- $drain := float64 .Values.drainTimeout }}
{{- if not (kindIs "invalid" .Values.terminationGracePeriodSeconds) }}
{{- $set := float64 .Values.terminationGracePeriodSeconds }}
{{- if le $set $drain }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must be above drainTimeout (%v): Kubernetes would kill the agent in the middle of its drain. Raise it (to at least drainTimeout + a few seconds to hand unfinished tasks back) or leave it unset to get drainTimeout + terminationGraceMargin." .Values.terminationGracePeriodSeconds .Values.drainTimeout) }}
{{- end }}
{{- int64 (ceil $set) }}
{{- else }}
{{- $margin := float64 .Values.terminationGraceMargin }}
{{- if le $margin 0.0 }}
{{- fail (printf "terminationGraceMargin (%v) must be above 0: the agent needs time after its drain to hand unfinished tasks back" .Values.terminationGraceMargin) }}
{{- end }}
{{- int64 (ceil (addf $drain $margin)) }}
{{- end }}
{{- end }}

{{/* The queue KEDA watches: the pool's queue (schemas/names.py). */}}
{{- define "rexec-agent.queueName" -}}
{{- printf "rexec.pool.%s" .Values.pool }}
{{- end }}

{{/* An IntOrString value: "50%" quoted, 1 as an integer. */}}
{{- define "rexec-agent.intOrString" -}}
{{- if kindIs "string" . }}{{ . | quote }}{{ else }}{{ int64 . }}{{ end }}
{{- end }}

{{/* A number as rexec parses it: 1048576, not 1.048576e+06 (YAML numbers reach templates as floats). */}}
{{- define "rexec-agent.number" -}}
{{- if or (kindIs "string" .) (kindIs "bool" .) }}{{ toString . }}{{ else if eq (float64 .) (floor .) }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- end }}

{{/* The CA bundle (tls.caBundle) as a pod volume, mounted at /etc/rexec/ca/ca.pem. */}}
{{- define "rexec-agent.caBundleVolume" -}}
{{- $ca := .Values.tls.caBundle -}}
- name: ca-bundle
  {{- if $ca.secret }}
  secret:
    secretName: {{ $ca.name }}
    items:
      - {key: {{ $ca.key | quote }}, path: ca.pem}
  {{- else }}
  configMap:
    name: {{ $ca.name }}
    items:
      - {key: {{ $ca.key | quote }}, path: ca.pem}
  {{- end }}
{{- end }}
