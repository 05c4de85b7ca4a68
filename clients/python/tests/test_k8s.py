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


DP = os.path.join(K8S, "data-parallel")


def dp_documents():
    kust = yaml.safe_load(open(os.path.join(DP, "kustomization.yaml")))
    assert kust["resources"] == ["mpijob.yaml"]
    return {d["kind"]: d for d in yaml.safe_load_all(open(os.path.join(DP, "mpijob.yaml"))) if d}


@pytest.mark.parametrize("version", VERSIONS)
def test_the_data_parallel_trainer_manifests_validate(version):
    docs = dp_documents()
    assert set(docs) == {"Service", "PersistentVolumeClaim", "MPIJob"}
    kubernetes_validate.validate(docs["Service"], version, strict=True)
    kubernetes_validate.validate(docs["PersistentVolumeClaim"], version, strict=True)
    # The MPIJob is the operator's custom resource; its pod templates are plain Kubernetes ones.
    for role, spec in docs["MPIJob"]["spec"]["mpiReplicaSpecs"].items():
        template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": role.lower()}, "template": spec["template"]}
        kubernetes_validate.validate(template, version, strict=True)


def test_the_mpijob_fits_the_operator_and_the_server():
    docs = dp_documents()
    job = docs["MPIJob"]
    assert job["apiVersion"] == "kubeflow.org/v2beta1"
    spec = job["spec"]
    # The v2beta1 MPIJob's fields (kubeflow/mpi-operator's API), and only those.
    assert set(spec) <= {"slotsPerWorker", "runPolicy", "mpiReplicaSpecs", "sshAuthMountPath", "mpiImplementation",
                         "launcherCreationPolicy", "runLauncherAsWorker"}
    assert spec["mpiImplementation"] == "OpenMPI" and set(spec["mpiReplicaSpecs"]) == {"Launcher", "Worker"}
    launcher = spec["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]["containers"][0]
    workers = spec["mpiReplicaSpecs"]["Worker"]
    argv = launcher["command"] + launcher["args"]
    assert argv[0] == "mpirun" and "--enable-recovery" in argv, "rank 0 survives another rank's death"
    ranks = int(argv[argv.index("-n") + 1])
    assert ranks == workers["replicas"] * spec["slotsPerWorker"], "one rank per worker slot"
    server_args = argv[argv.index("ember-server") + 1:]
    help_text = subprocess.run([SERVER, "--help"], capture_output=True, text=True).stdout
    flags = [a for a in server_args if a.startswith("--")]
    assert flags and all(f in help_text for f in flags), flags
    port = int(server_args[server_args.index("--port") + 1])
    # The Service reaches rank 0: worker 0 of this job, on the server's port.
    service = docs["Service"]
    assert service["spec"]["selector"] == {"training.kubeflow.org/job-name": job["metadata"]["name"],
                                           "training.kubeflow.org/job-role": "worker",
                                           "training.kubeflow.org/replica-index": "0"}
    assert service["spec"]["ports"][0]["targetPort"] == port
    worker = workers["template"]["spec"]["containers"][0]
    assert worker["command"] == ["/usr/sbin/sshd"] and worker["readinessProbe"]["tcpSocket"]["port"] == 2222
    # The launcher's liveness probe restarts the job when rank 0 reports itself degraded.
    assert launcher["livenessProbe"]["exec"]["command"] == ["ember", "health"]
    env = {e["name"]: e for e in launcher["env"]}
    assert env["EMBER_URL"]["value"] == f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    assert env["EMBER_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "ember-api-key", "key": "key"}
    assert "EMBER_API_KEY" in env["OMPI_MCA_mca_base_env_list"]["value"], "mpirun passes the key to the ranks"
    # Checkpoints on a claim every worker can mount.
    claim = docs["PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    volumes = {v["name"]: v for v in workers["template"]["spec"]["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in worker["volumeMounts"]}
    assert volumes["checkpoints"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    ckpt = server_args[server_args.index("--checkpoint-dir") + 1]
    assert mounts["checkpoints"] == ckpt
    # The image stage the job names exists, with sshd on the probed port and the operator's key path.
    dockerfile = open(os.path.join(ROOT, "docker", "Dockerfile")).read()
    mpi_stage = dockerfile.split("AS mpi", 1)[1]
    assert "openmpi-bin" in mpi_stage and "openssh-server" in mpi_stage and "Port 2222" in mpi_stage
    assert f"AuthorizedKeysFile {spec['sshAuthMountPath']}/authorized_keys" in mpi_stage
