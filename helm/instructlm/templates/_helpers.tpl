{{/* Names: <release>-instructlm unless the release name already contains the chart name. */}}
{{- define "instructlm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "instructlm.fullname" -}}
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

{{/* Labels of every object but the component, which each object adds. */}}
{{- define "instructlm.commonLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "instructlm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "instructlm.labels" -}}
{{ include "instructlm.commonLabels" . }}
app.kubernetes.io/component: server
{{- end }}

{{- define "instructlm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "instructlm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: server
{{- end }}

{{- define "instructlm.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "instructlm.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "instructlm.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{- define "instructlm.apiKeysSecret" -}}
{{- .Values.apiKeys.existingSecret | default (printf "%s-api-keys" (include "instructlm.fullname" .)) }}
{{- end }}

{{/* Grace period: the preStop pause, then the drain, then 5 s for the process to exit after its drain. */}}
{{- define "instructlm.terminationGracePeriodSeconds" -}}
{{- $needed := add .Values.server.preStopSleepSeconds .Values.server.drainTimeoutSeconds 5 }}
{{- $set := int .Values.server.terminationGracePeriodSeconds }}
{{- if eq $set 0 }}
{{- $needed }}
{{- else if lt $set (int (add .Values.server.preStopSleepSeconds .Values.server.drainTimeoutSeconds)) }}
{{- fail (printf "server.terminationGracePeriodSeconds=%d is shorter than server.preStopSleepSeconds + server.drainTimeoutSeconds = %d: Kubernetes would kill requests still draining" $set (int (add .Values.server.preStopSleepSeconds .Values.server.drainTimeoutSeconds))) }}
{{- else }}
{{- $set }}
{{- end }}
{{- end }}

{{/* Directories under the read-only root filesystem that the server writes. */}}
{{- define "instructlm.cacheDir" -}}/var/cache/instructlm{{- end }}
