"""docker/k8s, checked offline: every manifest validates (strict) against the Kubernetes schemas
bundled by kubernetes-validate, and the pieces agree with each other and with the server (selectors,
Service names and ports, the Secret, probes on /healthz, flags ember-server accepts)."""
import copy
import os
import re
import subprocess

import kubernetes_validate
import pytest
import yaml

from conftest import ROOT, SERVER

K8S = os.path.join(ROOT, "docker", "k8s")
VERSIONS = ["1.30", "1.33"]


def documents():
    kust = yaml.safe_load(open(os.path.join(K8S, "kustomization.yaml")))
    files = sorted(f for f in os.listdir(K8S) if f.endswith(".yaml") and f != "kustomization.yaml")
    assert sorted(kust["resources"]) == files, "kustomization.yaml lists every manifest"
    return [(f, d) for f in files for d in yaml.safe_load_all(open(os.path.join(K8S, f))) if d]


def by_kind(kind):
    return {d["metadata"]["name"]: d for _, d in documents() if d["kind"] == kind}


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schemas(version):
    docs = documents()
    assert {d["kind"] for _, d in docs} == {"Service", "StatefulSet", "Deployment"}
    for f, d in docs:
        kubernetes_validate.validate(d, version, strict=True)
    # The validator is not vacuous: a misspelt field and a wrong type are refused.
    bad = copy.deepcopy(by_kind("Deployment")["ember-sampler"])
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProb"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, version, strict=True)
    bad = copy.deepcopy(by_kind("Service")["ember-trainer"])
    bad["spec"]["ports"][0]["port"] = "eighty"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, version, strict=True)


def containers():
    out = {}
    for kind in ("StatefulSet", "Deployment"):
        for name, d in by_kind(kind).items():
            out[name] = (d, d["spec"]["template"]["spec"]["containers"][0])
    return out


def test_the_pieces_fit_together():
    services = by_kind("Service")
    workloads = containers()
    assert set(workloads) == {"ember-trainer", "ember-sampler"} and set(services) == set(workloads)
    for name, (w, c) in workloads.items():
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert w["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert services[name]["spec"]["selector"].items() <= labels.items(), "the Service selects the pods"
        port = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert port == {"http": 8377} and services[name]["spec"]["ports"][0]["targetPort"] == "http"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"] == {"path": "/healthz", "port": "http"}, (name, probe)
        assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
        env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"]}
        assert env["EMBER_API_KEY"] == {"name": "ember-api-key", "key": "key"}
        assert w["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 10001, "the image's user"
        # A read-only root: /tmp (the follower's staging) is a volume.
        assert c["securityContext"]["readOnlyRootFilesystem"] and any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])
    trainer = workloads["ember-trainer"][0]
    assert trainer["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "checkpoints"
    assert any(m["mountPath"] == "/var/lib/ember" for m in workloads["ember-trainer"][1]["volumeMounts"])
    sampler = workloads["ember-sampler"][1]
    args = sampler["args"]
    follow = args[args.index("--follow") + 1]
    assert follow == f"http://ember-trainer:{services['ember-trainer']['spec']['ports'][0]['port']}"
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in sampler["env"]}
    assert env["EMBER_FOLLOW_API_KEY"] == env["EMBER_API_KEY"], "replicas follow with the trainer's key"


def test_every_flag_is_one_ember_server_accepts():
    help_text = subprocess.run([SERVER, "--help"], capture_output=True, text=True).stdout
    dockerfile = open(os.path.join(ROOT, "docker", "Dockerfile")).read()
    entry = re.search(r'ENTRYPOINT \[(.*?)\]', dockerfile).group(1)
    flags = set(re.findall(r'"(--[a-z-]+)"', entry))
    for _, c in containers().values():
        flags |= {a for a in c.get("args", []) + c.get("command", []) if a.startswith("--")}
    assert flags and all(f in help_text for f in flags), sorted(f for f in flags if f not in help_text)
