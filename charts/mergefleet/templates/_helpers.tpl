{{/* Names and labels shared by every template. */}}
{{- define "mergefleet.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "mergefleet.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "mergefleet.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "mergefleet.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}
{{- end -}}

{{- define "mergefleet.prefectApiUrl" -}}
{{- if .Values.prefect.server.enabled -}}
http://{{ include "mergefleet.fullname" . }}-prefect.{{ .Release.Namespace }}.svc:{{ .Values.prefect.server.port }}/api
{{- else -}}
{{ required "prefect.apiUrl is required when prefect.server.enabled is false" .Values.prefect.apiUrl }}
{{- end -}}
{{- end -}}

{{- define "mergefleet.mlflowUri" -}}
{{- if .Values.mlflow.server.enabled -}}
http://{{ include "mergefleet.fullname" . }}-mlflow.{{ .Release.Namespace }}.svc:{{ .Values.mlflow.server.port }}
{{- else -}}
{{ .Values.mlflow.trackingUri }}
{{- end -}}
{{- end -}}

{{/* A Prefect job-template placeholder, e.g. {{ image }}: filled in by the worker per flow run. */}}
{{- define "mergefleet.var" -}}
{{- printf "{{ %s }}" . -}}
{{- end -}}

{{/* The pod and container settings every container of the chart shares. */}}
{{- define "mergefleet.podSecurity" -}}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "mergefleet.scratch" -}}
- name: scratch
  emptyDir:
    sizeLimit: {{ . }}
{{- end -}}
