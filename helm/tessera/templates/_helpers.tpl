{{/* Names, labels and shared fragments. */}}

{{- define "tessera.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tessera.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tessera.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "tessera.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: include with (list . "router"). */}}
{{- define "tessera.selector" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "tessera.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "tessera.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "tessera.workerImage" -}}
{{- if eq .Values.worker.device "cuda" -}}
{{- printf "%s:%s" .Values.image.repository (default (printf "%s-cuda" (default .Chart.AppVersion .Values.image.tag)) .Values.image.cudaTag) -}}
{{- else -}}
{{- include "tessera.image" . -}}
{{- end -}}
{{- end -}}

{{/* Comma-separated etcd client URLs. */}}
{{- define "tessera.etcdEndpoints" -}}
{{- if .Values.etcd.enabled -}}
{{- $name := printf "%s-etcd" (include "tessera.fullname" .) -}}
{{- $eps := list -}}
{{- range $i := until (int .Values.etcd.replicas) -}}
{{- $eps = append $eps (printf "http://%s-%d.%s.%s.svc:2379" $name $i $name $.Release.Namespace) -}}
{{- end -}}
{{- join "," $eps -}}
{{- else -}}
{{- join "," .Values.etcd.externalEndpoints -}}
{{- end -}}
{{- end -}}

{{- define "tessera.apiKeySecret" -}}
{{- default (printf "%s-api-keys" (include "tessera.fullname" .)) .Values.router.apiKeys.existingSecret -}}
{{- end -}}

{{- define "tessera.hasApiKeys" -}}
{{- if or .Values.router.apiKeys.existingSecret .Values.router.apiKeys.keys -}}true{{- end -}}
{{- end -}}

{{- define "tessera.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* A duration such as 30s, 5m or 1h in whole seconds. */}}
{{- define "tessera.seconds" -}}
{{- $d := toString . -}}
{{- $n := regexFind "^[0-9]+" $d -}}
{{- $unit := trimPrefix $n $d -}}
{{- if eq $unit "h" -}}{{ mul (int $n) 3600 }}{{- else if eq $unit "m" -}}{{ mul (int $n) 60 }}{{- else -}}{{ int $n }}{{- end -}}
{{- end -}}
