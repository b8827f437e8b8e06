#!/usr/bin/env python3
"""Writes deploy/grafana/headroom.json, the Grafana dashboard for headroom's agents and aggregator.

Edit the panels here and rerun; the JSON is committed so operators import it without Python.
tests/e2e/deploy.rs runs every expression of the JSON in a real Prometheus scraping a real agent.
"""
import os
import json
panels=[]; pid=[0]; y=[0]
def nid():
    pid[0]+=1; return pid[0]
def row(title):
    panels.append({"type":"row","title":title,"id":nid(),"collapsed":False,"gridPos":{"h":1,"w":24,"x":0,"y":y[0]},"panels":[]})
    y[0]+=1
col=[0]
def ts(title, targets, unit="short", w=12, h=8, desc="", kind="timeseries", overrides=None, stack=False):
    x=col[0]
    if x+w>24: x=0; y[0]+=h
    p={"type":kind,"title":title,"id":nid(),"datasource":{"type":"prometheus","uid":"${datasource}"},
       "gridPos":{"h":h,"w":w,"x":x,"y":y[0]},"description":desc,
       "fieldConfig":{"defaults":{"unit":unit},"overrides":overrides or []},
       "targets":[{"refId":chr(65+i),"expr":e,"legendFormat":l,"datasource":{"type":"prometheus","uid":"${datasource}"}} for i,(e,l) in enumerate(targets)]}
    if kind=="timeseries":
        p["fieldConfig"]["defaults"]["custom"]={"lineWidth":1,"fillOpacity":10 if stack else 0,"stacking":{"mode":"normal" if stack else "none"}}
        p["options"]={"legend":{"displayMode":"list","placement":"bottom"},"tooltip":{"mode":"multi","sort":"desc"}}
    panels.append(p)
    col[0]=x+w
    if col[0]>=24: col[0]=0; y[0]+=h
def newrow(title):
    if col[0]!=0: col[0]=0; y[0]+=8
    row(title)
I='instance=~"$instance"'
NS='namespace=~"$namespace"'
newrow("Node")
ts("CPU in use", [(f'headroom_node_cpu_usage_cores{{{I}}}', "{{instance}} busy"), (f'headroom_node_cpus{{{I}}}', "{{instance}} CPUs")], "none", w=8, desc="Cores busy since the previous sample, and online CPUs.")
ts("Memory in use", [(f'headroom_node_memory_total_bytes{{{I}}} - headroom_node_memory_available_bytes{{{I}}}', "{{instance}} used"), (f'headroom_node_memory_total_bytes{{{I}}}', "{{instance}} total")], "bytes", w=8)
ts("Pressure stall (some)", [(f'headroom_node_pressure_some_ratio{{{I}}}', "{{instance}} {{resource}}")], "percentunit", w=8, desc="Share of time some task stalled on CPU, memory or I/O (PSI).")
newrow("Containers")
ts("CPU by container (top 10)", [(f'topk(10, headroom_container_cpu_usage_cores{{{I},{NS}}})', "{{namespace}}/{{pod}}/{{container}} {{cgroup}}")], "none", desc="Cores used since the previous sample.")
ts("CPU used / quota (top 10)", [(f'topk(10, headroom_container_cpu_usage_cores{{{I},{NS}}} / headroom_container_cpu_quota_cores{{{I},{NS}}})', "{{namespace}}/{{pod}}/{{container}} {{cgroup}}")], "percentunit", desc="Usage against the CFS quota in force (the capacity headroom applies).")
ts("CPU throttled (top 10)", [(f'topk(10, headroom_container_cpu_throttled_ratio{{{I},{NS}}})', "{{namespace}}/{{pod}}/{{container}} {{cgroup}}")], "percentunit", desc="Share of CFS periods throttled since the previous sample.")
ts("Memory working set / limit (top 10)", [(f'topk(10, headroom_container_memory_working_set_bytes{{{I},{NS}}} / headroom_container_memory_limit_bytes{{{I},{NS}}})', "{{namespace}}/{{pod}}/{{container}} {{cgroup}}")], "percentunit")
ts("Memory working set (top 10)", [(f'topk(10, headroom_container_memory_working_set_bytes{{{I},{NS}}})', "{{namespace}}/{{pod}}/{{container}} {{cgroup}}")], "bytes")
ts("OOM kills (1 h)", [(f'increase(headroom_container_oom_kills_total{{{I},{NS}}}[1h]) > 0', "{{namespace}}/{{pod}}/{{container}} {{cgroup}}")], "none")
newrow("Request latency and run-queue delay (eBPF)")
ts("Request latency p99", [(f'histogram_quantile(0.99, sum by (le, instance, namespace, pod, container, cgroup, port) (rate(headroom_request_latency_seconds_bucket{{{I},{NS}}}[$__rate_interval])))', "{{namespace}}/{{pod}}/{{container}} {{cgroup}} :{{port}}")], "s", desc="Per-container request latency measured in the kernel (socket receive to send).")
ts("Run-queue delay p99", [(f'histogram_quantile(0.99, sum by (le, instance, namespace, pod, container, cgroup) (rate(headroom_runqueue_delay_seconds_bucket{{{I},{NS}}}[$__rate_interval])))', "{{namespace}}/{{pod}}/{{container}} {{cgroup}}")], "s", desc="Time runnable tasks waited for a CPU.")
ts("Requests per second", [(f'sum by (instance, namespace, pod, container, cgroup, port) (rate(headroom_request_latency_seconds_count{{{I},{NS}}}[$__rate_interval]))', "{{namespace}}/{{pod}}/{{container}} {{cgroup}} :{{port}}")], "reqps")
ts("eBPF programs attached", [(f'headroom_ebpf_program_up{{{I}}}', "{{instance}} {{program}}")], "none", desc="1 when the program is loaded and attached; 0 when the kernel refused it (see /v1/status).")
newrow("GPUs")
ts("GPU utilisation", [(f'headroom_gpu_utilization_ratio{{{I}}}', "{{Hostname}} GPU {{gpu}} {{modelName}}")], "percentunit")
ts("GPU memory used / total", [(f'headroom_gpu_memory_used_bytes{{{I}}} / headroom_gpu_memory_total_bytes{{{I}}}', "{{Hostname}} GPU {{gpu}}")], "percentunit")
ts("GPU power", [(f'headroom_gpu_power_watts{{{I}}}', "{{Hostname}} GPU {{gpu}}"), (f'headroom_gpu_power_limit_watts{{{I}}}', "{{Hostname}} GPU {{gpu}} limit")], "watt")
ts("GPU temperature", [(f'headroom_gpu_temperature_celsius{{{I}}}', "{{Hostname}} GPU {{gpu}}")], "celsius")
ts("GPU memory by container", [(f'sum by (Hostname, gpu, namespace, pod, container) (headroom_gpu_container_memory_used_bytes{{{I}}})', "{{Hostname}} GPU {{gpu}} {{namespace}}/{{pod}}/{{container}}")], "bytes", stack=True)
ts("GPU SM utilisation by container", [(f'sum by (Hostname, gpu, namespace, pod, container) (headroom_gpu_container_sm_utilization_ratio{{{I}}})', "{{Hostname}} GPU {{gpu}} {{namespace}}/{{pod}}/{{container}}")], "percentunit", stack=True)
ts("GPU health", [(f'min by (Hostname, gpu) (headroom_gpu_healthy{{{I}}})', "{{Hostname}} GPU {{gpu}}"), (f'headroom_gpu_nvml_up{{{I}}}', "{{instance}} NVML")], "none", desc="1 healthy; 0 after an XID or ECC fault. NVML up is 0 when the library cannot be loaded.")
newrow("Forecasts")
ts("CPU: demand and forecast upper bound (top 10)", [(f'topk(10, headroom_forecast_upper{{series="container_cpu_usage_cores", {I},{NS}}})', "bound {{namespace}}/{{pod}}/{{container}} {{cgroup}}"), (f'topk(10, headroom_container_cpu_usage_cores{{{I},{NS}}})', "demand {{namespace}}/{{pod}}/{{container}} {{cgroup}}")], "none", desc="Upper bound of demand over the forecast lead time (dashed in the status page) against what was used.")
ts("Memory: forecast upper bound (top 10)", [(f'topk(10, headroom_forecast_upper{{series="container_memory_working_set_bytes", {I},{NS}}})', "bound {{namespace}}/{{pod}}/{{container}} {{cgroup}}")], "bytes")
ts("GPU: forecast upper bound", [(f'headroom_forecast_upper{{series=~"gpu_.*|container_gpu_.*", {I}}}', "{{series}} {{UUID}} {{cgroup}}")], "short", w=8)
ts("Forecast misses (recent)", [(f'topk(10, headroom_forecast_recent_violation_ratio{{{I}}})', "{{series}} {{cgroup}} {{UUID}}")], "percentunit", w=8, desc="Share of recent steps whose demand exceeded the bound; the target is the configured violation rate.")
ts("Forecast slack (recent)", [(f'topk(10, headroom_forecast_recent_slack_ratio{{{I}}})', "{{series}} {{cgroup}} {{UUID}}")], "percentunit", w=8, desc="Spare capacity the bound kept: sum(max(bound - demand, 0)) / sum(demand).")
ts("Models in charge", [(f'count by (model) (headroom_forecast_model_info{{{I}}})', "{{model}}")], "none", w=12, kind="bargauge")
newrow("Decisions")
ts("Decisions per minute", [(f'sum by (resource, reason, applied) (rate(headroom_decisions_total{{{I}}}[$__rate_interval])) * 60', "{{resource}} {{reason}} applied={{applied}}")], "none", stack=True)
ts("Decisions in range", [(f'sum by (resource, reason, applied) (increase(headroom_decisions_total{{{I}}}[$__range]))', "{{resource}} {{reason}} applied={{applied}}")], "none", kind="bargauge")
newrow("Aggregator and scaling")
ts("Desired vs current replicas", [('headroom_workload_desired_replicas{workload=~"$workload"}', "{{workload}} desired"), ('headroom_workload_current_replicas{workload=~"$workload"}', "{{workload}} current")], "none")
ts("Demand vs capacity", [('headroom_workload_demand{workload=~"$workload"}', "{{workload}} {{resource}} demand"), ('headroom_workload_capacity{workload=~"$workload"}', "{{workload}} {{resource}} capacity")], "short")
ts("Nodes reporting", [('headroom_aggregator_nodes', "{{instance}}")], "none", w=8)
ts("Hint batches", [('sum by (result) (rate(headroom_aggregator_batches_total[$__rate_interval]))', "{{result}}"), ('sum by (reason) (rate(headroom_aggregator_rejected_total[$__rate_interval]))', "rejected {{reason}}")], "reqps", w=8)
ts("Merged confidence", [('headroom_workload_confidence_ratio{workload=~"$workload"}', "{{workload}} {{resource}}")], "percentunit", w=8)
newrow("Agent")
ts("Agent CPU", [(f'rate(headroom_agent_cpu_seconds_total{{{I}}}[$__rate_interval])', "{{instance}}")], "percentunit", w=8)
ts("Agent memory", [(f'headroom_agent_resident_memory_bytes{{{I}}}', "{{instance}}")], "bytes", w=8)
ts("Samplers up", [(f'headroom_agent_sampler_up{{{I}}}', "{{instance}} {{sampler}}")], "none", w=8)
def var(name, query, label, multi=True):
    return {"name":name,"label":label,"type":"query","datasource":{"type":"prometheus","uid":"${datasource}"},
            "query":{"query":query,"refId":name},"definition":query,"refresh":2,"includeAll":True,"multi":multi,
            "allValue":".*","current":{"selected":True,"text":["All"],"value":["$__all"]},"sort":1}
dash={"title":"headroom","uid":"headroom","description":"headroom node agents and aggregator: node, containers, request latency, GPUs, forecasts, decisions and scaling.",
 "tags":["headroom","gpu","autoscaling"],"timezone":"browser","schemaVersion":39,"version":1,"editable":True,
 "time":{"from":"now-6h","to":"now"},"refresh":"30s","graphTooltip":1,
 "templating":{"list":[
   {"name":"datasource","label":"Data source","type":"datasource","query":"prometheus","current":{}, "hide":0},
   var("instance","label_values(headroom_build_info, instance)","Agent"),
   var("namespace","label_values(headroom_container_info, namespace)","Namespace"),
   var("workload","label_values(headroom_workload_desired_replicas, workload)","Workload")]},
 "annotations":{"list":[{"name":"Applied decisions","datasource":{"type":"prometheus","uid":"${datasource}"},"enable":True,"iconColor":"red",
   "expr":"sum by (resource, reason) (increase(headroom_decisions_total{applied=\"true\"}[2m])) > 0","titleFormat":"{{resource}} {{reason}}","step":"60s"}]},
 "panels":panels}
out = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deploy", "grafana", "headroom.json")
with open(out, "w") as f:
    json.dump(dash, f, indent=2)
    f.write("\n")
print(f"{out}: {len(panels)} panels")
