{{/* Names. */}}
{{- define "rexec.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "rexec.fullname" -}}
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

{{- define "rexec.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Kubernetes recommended labels. */}}
{{- define "rexec.labels" -}}
helm.sh/chart: {{ include "rexec.chart" . }}
{{ include "rexec.selectorLabels" . }}
app.kubernetes.io/version: {{ (.Values.image.tag | default .Chart.AppVersion) | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/component: dispatcher
app.kubernetes.io/part-of: rexec
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "rexec.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rexec.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "rexec.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "rexec.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "rexec.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion -}}
{{- if hasPrefix "sha256:" $tag -}}
{{- printf "%s@%s" .Values.image.repository $tag -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end }}

{{/* The Secret the chart creates for values given inline. */}}
{{- define "rexec.secretName" -}}
{{- include "rexec.fullname" . }}
{{- end }}

{{/* The settings given inline, as a JSON map: key in the chart's Secret -> value. */}}
{{- define "rexec.inlineSecrets" -}}
{{- $out := dict }}
{{- if .Values.database.url }}{{ $_ := set $out "database-url" .Values.database.url }}{{ end }}
{{- if .Values.broker.url }}{{ $_ := set $out "amqp-url" .Values.broker.url }}{{ end }}
{{- if .Values.redis.url }}{{ $_ := set $out "redis-url" .Values.redis.url }}{{ end }}
{{- if .Values.management.url }}{{ $_ := set $out "management-url" .Values.management.url }}{{ end }}
{{- if and .Values.apiKey.enabled .Values.apiKey.value }}{{ $_ := set $out "api-key" .Values.apiKey.value }}{{ end }}
{{- if and .Values.signingKey.enabled .Values.signingKey.value }}{{ $_ := set $out "signing-key" .Values.signingKey.value }}{{ end }}
{{- toJson $out }}
{{- end }}

{{/*
A secretKeyRef for one setting: the chart's own Secret when the value is inline, else the
existing Secret. Arguments: (list $ <values block> <key in the chart's Secret> <values path>).
*/}}
{{- define "rexec.secretKeyRef" -}}
{{- $root := index . 0 }}
{{- $block := index . 1 }}
{{- $key := index . 2 }}
{{- $what := index . 3 }}
{{- if or $block.value $block.url }}
secretKeyRef:
  name: {{ include "rexec.secretName" $root }}
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

{{/* An IntOrString value: "50%" quoted, 1 as an integer. */}}
{{- define "rexec.intOrString" -}}
{{- if kindIs "string" . }}{{ . | quote }}{{ else }}{{ int64 . }}{{ end }}
{{- end }}

{{/* A number as rexec parses it: 1048576, not 1.048576e+06 (YAML numbers reach templates as floats). */}}
{{- define "rexec.number" -}}
{{- if or (kindIs "string" .) (kindIs "bool" .) }}{{ toString . }}{{ else if eq (float64 .) (floor .) }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- end }}

{{/* The CA bundle (tls.caBundle) as a pod volume, mounted at /etc/rexec/ca/ca.pem. */}}
{{- define "rexec.caBundleVolume" -}}
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
