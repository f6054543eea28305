"""Every manifest under deploy/ against the JSON schema of its kind, and against the others.

The schemas live in the shared folder beside the repository (`../shared/schemas`, see its
README); the test fails, never skips, when they are missing. CRD schemas accept any field, so
fields that no schema property names are reported here too (the API server prunes or, with
kubectl's default strict field validation, rejects them).

Consistency: Services select their Deployments' pods and target their container ports; the
ScaledObject scales a Deployment and calls the activator's Service on its KEDA port; the
activator's replica host is the predictor's headless Service; Istio routes name hosts and
subsets that exist; each InferenceService names a runtime, format and protocol that exist, and
keeps to one port where Knative serves it. Every container running `ember` has arguments that
ember's own parser accepts (with what KServe adds to them).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from ember.activator.settings import settings_from as activator_settings
from ember.server.cli import _parser
from ember.server.settings import settings_from as serve_settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SCHEMAS = ROOT / ".." / "shared" / "schemas"
EMBER_IMAGE = "registry.example.com/ember:0.1.0-cuda13.0"

SCHEMA_FILES = {
    ("serving.kserve.io/v1beta1", "InferenceService"): "kserve-inferenceservice-v1beta1.json",
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "kserve-servingruntime-v1alpha1.json",
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): (
        "kserve-clusterservingruntime-v1alpha1.json"
    ),
    ("keda.sh/v1alpha1", "ScaledObject"): "keda-scaledobject-v1alpha1.json",
    ("networking.istio.io/v1", "VirtualService"): "istio-virtualservice-v1.json",
    ("networking.istio.io/v1", "DestinationRule"): "istio-destinationrule-v1.json",
    ("serving.knative.dev/v1", "Service"): "knative-service-v1.json",
    ("apps/v1", "Deployment"): "k8s-deployment-apps-v1.json",
    ("v1", "Service"): "k8s-service-v1.json",
}
# What KServe adds to a transformer container's args (PROTOCOLS.md, the KServe contract).
KSERVE_HTTP_PORT = 8080


@dataclass(frozen=True)
class Doc:
    path: Path
    index: int
    body: dict[str, Any]

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}#{self.index}"

    @property
    def kind(self) -> tuple[str, str]:
        return (str(self.body.get("apiVersion")), str(self.body.get("kind")))

    @property
    def name(self) -> str:
        return str(self.body["metadata"]["name"])

    @property
    def namespace(self) -> str:
        return str(self.body["metadata"].get("namespace", "default"))

    @property
    def folder(self) -> str:
        return self.path.parent.name


def load_docs() -> list[Doc]:
    docs = []
    for path in sorted(DEPLOY.rglob("*.y*ml")):
        with path.open(encoding="utf-8") as file:
            for index, body in enumerate(yaml.safe_load_all(file)):
                if body is not None:
                    docs.append(Doc(path, index, body))
    return docs


DOCS = load_docs()


def of(kind: tuple[str, str], folder: str | None = None) -> list[Doc]:
    return [d for d in DOCS if d.kind == kind and (folder is None or d.folder == folder)]


DEPLOYMENT = ("apps/v1", "Deployment")
SERVICE = ("v1", "Service")
SCALED_OBJECT = ("keda.sh/v1alpha1", "ScaledObject")
VIRTUAL_SERVICE = ("networking.istio.io/v1", "VirtualService")
DESTINATION_RULE = ("networking.istio.io/v1", "DestinationRule")
KNATIVE_SERVICE = ("serving.knative.dev/v1", "Service")
ISVC = ("serving.kserve.io/v1beta1", "InferenceService")
CLUSTER_RUNTIME = ("serving.kserve.io/v1alpha1", "ClusterServingRuntime")


# --- schemas ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def schemas() -> dict[tuple[str, str], dict[str, Any]]:
    if not SCHEMAS.is_dir():
        pytest.fail(f"the shared JSON schemas are missing: {SCHEMAS.resolve()} is not a folder")
    loaded = {}
    for kind, name in SCHEMA_FILES.items():
        file = SCHEMAS / name
        if not file.is_file():
            pytest.fail(f"schema {file.resolve()} for {kind} is missing")
        loaded[kind] = json.loads(file.read_text(encoding="utf-8"))
    return loaded


def unknown_fields(value: Any, schema: dict[str, Any], path: str) -> Iterator[str]:
    """Fields a structural schema does not declare (where it declares any)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return
    if isinstance(value, dict):
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if properties is not None and key in properties:
                yield from unknown_fields(item, properties[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                yield from unknown_fields(item, extra, f"{path}.{key}")
            elif properties is not None and extra is not True:
                yield f"{path}.{key}"
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            yield from unknown_fields(item, schema["items"], f"{path}[{i}]")


def test_every_folder_has_manifests() -> None:
    folders = {d.folder for d in DOCS}
    assert {"kserve", "keda", "knative", "istio"} <= folders, folders


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.where)
def test_manifest_matches_its_schema(
    doc: Doc, schemas: dict[tuple[str, str], dict[str, Any]]
) -> None:
    assert doc.kind in SCHEMA_FILES, f"{doc.where}: no schema for {doc.kind}"
    schema = schemas[doc.kind]
    errors = sorted(
        jsonschema.Draft7Validator(schema).iter_errors(doc.body), key=lambda e: list(e.path)
    )
    assert not errors, "\n".join(f"{doc.where} {list(e.path)}: {e.message}" for e in errors)
    unknown = list(unknown_fields(doc.body, schema, doc.kind[1]))
    assert not unknown, f"{doc.where}: fields the schema does not know: {unknown}"


# --- pods, ports and selectors --------------------------------------------------------------


def pod_spec(doc: Doc) -> dict[str, Any]:
    spec: dict[str, Any] = doc.body["spec"]["template"]["spec"]
    return spec


def pod_labels(doc: Doc) -> dict[str, str]:
    labels: dict[str, str] = doc.body["spec"]["template"]["metadata"].get("labels", {})
    return labels


def container_ports(deployment: Doc) -> set[str | int]:
    ports: set[str | int] = set()
    for container in pod_spec(deployment)["containers"]:
        for port in container.get("ports", []):
            ports.add(int(port["containerPort"]))
            if "name" in port:
                ports.add(str(port["name"]))
    return ports


def selected(service: Doc) -> list[Doc]:
    selector = service.body["spec"].get("selector", {})
    return [
        d
        for d in of(DEPLOYMENT)
        if d.namespace == service.namespace
        and selector
        and selector.items() <= pod_labels(d).items()
    ]


@pytest.mark.parametrize("deployment", of(DEPLOYMENT), ids=lambda d: d.where)
def test_deployment_selector_matches_its_pods(deployment: Doc) -> None:
    match = deployment.body["spec"]["selector"]["matchLabels"]
    assert match.items() <= pod_labels(deployment).items(), deployment.where


@pytest.mark.parametrize("service", of(SERVICE), ids=lambda d: d.where)
def test_service_selects_pods_and_targets_their_ports(service: Doc) -> None:
    pods = selected(service)
    assert pods, f"{service.where}: its selector matches no Deployment's pod labels"
    for port in service.body["spec"]["ports"]:
        target = port.get("targetPort", port["port"])
        for deployment in pods:
            assert target in container_ports(deployment), (
                f"{service.where}: targetPort {target!r} is not a container port of "
                f"{deployment.name}: {container_ports(deployment)}"
            )


# --- ember's own command line ---------------------------------------------------------------


@dataclass
class EmberCall:
    where: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


def ember_argv(container: dict[str, Any]) -> list[str] | None:
    """The `ember ...` arguments this container runs, or None if it does not run ember."""
    command = [str(c) for c in container.get("command", [])]
    args = [str(a) for a in container.get("args", [])]
    if command:
        return command[1:] + args if Path(command[0]).name == "ember" else None
    # The image's ENTRYPOINT is ["ember"]: args replace only its CMD.
    return args if container.get("image") == EMBER_IMAGE else None


def plain_env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: str(e["value"]) for e in container.get("env", []) if "value" in e}


def runtime_containers() -> dict[str, dict[str, Any]]:
    return {
        d.name: next(c for c in d.body["spec"]["containers"] if c["name"] == "kserve-container")
        for d in of(CLUSTER_RUNTIME)
    }


def ember_calls() -> list[EmberCall]:
    calls = []
    for doc in DOCS:
        if doc.kind == DEPLOYMENT:
            spec = pod_spec(doc)
            containers = spec.get("initContainers", []) + spec["containers"]
        elif doc.kind == KNATIVE_SERVICE:
            containers = doc.body["spec"]["template"]["spec"]["containers"]
        elif doc.kind == CLUSTER_RUNTIME:
            containers = doc.body["spec"]["containers"]
        else:
            continue
        for container in containers:
            argv = ember_argv(container)
            if argv is not None:
                where = f"{doc.where} {container['name']}"
                calls.append(EmberCall(where, argv, plain_env(container)))
    runtimes = runtime_containers()
    for doc in of(ISVC):
        predictor = doc.body["spec"]["predictor"]
        runtime = runtimes.get(predictor["model"].get("runtime", ""))
        if runtime is not None:
            # KServe runs the runtime's args followed by the InferenceService's own.
            argv = [str(a) for a in runtime.get("args", []) + predictor["model"].get("args", [])]
            calls.append(EmberCall(f"{doc.where} predictor", argv, plain_env(runtime)))
        for container in doc.body["spec"].get("transformer", {}).get("containers", []):
            argv = ember_argv(container)
            assert argv is not None, f"{doc.where}: the transformer does not run ember"
            argv += ["--model_name", doc.name,
                     "--predictor_host", f"{doc.name}-predictor.{doc.namespace}",
                     "--http_port", str(KSERVE_HTTP_PORT)]  # fmt: skip
            calls.append(EmberCall(f"{doc.where} transformer", argv, plain_env(container)))
    return calls


CALLS = ember_calls()


def parse(call: EmberCall) -> argparse.Namespace:
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return _parser().parse_args(call.argv)
    except SystemExit:
        pytest.fail(f"{call.where}: `ember {' '.join(call.argv)}`: {errors.getvalue().strip()}")


def test_ember_runs_in_every_kind_of_manifest() -> None:
    commands = {c.argv[0] for c in CALLS if c.argv}
    assert {"serve", "activator", "pull", "transformer"} <= commands, commands


@pytest.mark.parametrize("call", CALLS, ids=lambda c: c.where)
def test_ember_arguments_parse_with_embers_own_parser(call: EmberCall) -> None:
    args = parse(call)
    if args.command in ("serve", "transformer"):
        settings = serve_settings(args, call.env)
        assert settings.http_port == 8080, call.where
        if args.command == "transformer":
            assert args.predictor_host and args.predictor_protocol in ("v1", "v2", "grpc-v2")
    elif args.command == "activator":
        activator_settings(args)


@pytest.mark.parametrize(
    "doc", [d for d in DOCS if d.kind in (DEPLOYMENT, KNATIVE_SERVICE)], ids=lambda d: d.where
)
def test_ember_containers_use_the_ember_image(doc: Doc) -> None:
    spec = doc.body["spec"]["template"]["spec"]
    for container in spec.get("initContainers", []) + spec["containers"]:
        assert container["image"] == EMBER_IMAGE, (doc.where, container["image"])


# --- KEDA and the activator -----------------------------------------------------------------


def activator_args() -> tuple[Doc, argparse.Namespace]:
    found = []
    for doc in of(DEPLOYMENT, "keda"):
        for container in pod_spec(doc)["containers"]:
            argv = ember_argv(container)
            if argv and argv[0] == "activator":
                found.append((doc, parse(EmberCall(doc.where, argv))))
    assert len(found) == 1, found
    return found[0]


def serve_args(deployment: Doc) -> argparse.Namespace:
    (container,) = pod_spec(deployment)["containers"]
    argv = ember_argv(container)
    assert argv and argv[0] == "serve", deployment.where
    return parse(EmberCall(deployment.where, argv))


@pytest.mark.parametrize("scaled", of(SCALED_OBJECT), ids=lambda d: d.where)
def test_scaled_object_targets_the_predictor_and_the_activator(scaled: Doc) -> None:
    spec = scaled.body["spec"]
    assert spec["minReplicaCount"] == 0
    target = spec["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment"
    deployments = {d.name: d for d in of(DEPLOYMENT) if d.namespace == scaled.namespace}
    assert target["name"] in deployments, (target, sorted(deployments))
    predictor = deployments[target["name"]]
    (trigger,) = spec["triggers"]
    assert trigger["type"] in ("external-push", "external"), trigger
    model = trigger["metadata"]["model"]
    assert serve_args(predictor).model_name == model

    activator, args = activator_args()
    assert args.backend == "keda"
    host, _, port = trigger["metadata"]["scalerAddress"].rpartition(":")
    services = [
        s
        for s in of(SERVICE)
        if host in (f"{s.name}.{s.namespace}.svc.cluster.local", f"{s.name}.{s.namespace}.svc")
    ]
    assert len(services) == 1, f"scalerAddress {host} names no activator Service"
    (service,) = services
    assert activator in selected(service), f"{service.name} does not select the activator"
    (keda_port,) = [p for p in service.body["spec"]["ports"] if p["port"] == int(port)]
    target_port = keda_port.get("targetPort", keda_port["port"])
    named = {
        p.get("name"): int(p["containerPort"])
        for c in pod_spec(activator)["containers"]
        for p in c.get("ports", [])
    }
    assert named.get(target_port, target_port) == args.keda_port, (keda_port, args.keda_port)

    # The activator finds replicas as the addresses of `--replica-host`: a headless Service
    # selecting the scaled Deployment, whose pods listen on the replica ports.
    replica_host = args.replica_host.format(model=model)
    (headless,) = [s for s in of(SERVICE) if s.name == replica_host]
    assert headless.body["spec"].get("clusterIP") == "None", headless.where
    assert selected(headless) == [predictor]
    served = serve_args(predictor)
    assert (served.http_port, served.grpc_port) == (args.replica_http_port, args.replica_grpc_port)
    assert {args.replica_http_port, args.replica_grpc_port} <= container_ports(predictor)


def test_activator_pulls_the_model_config_of_every_scaled_model() -> None:
    activator, args = activator_args()
    pulls = [ember_argv(c) for c in pod_spec(activator).get("initContainers", [])]
    folders = {
        Path(a[a.index("--dest") + 1]).relative_to(args.model_repository).parts[0]
        for a in pulls
        if a and a[0] == "pull"
    }
    models = {s.body["spec"]["triggers"][0]["metadata"]["model"] for s in of(SCALED_OBJECT)}
    assert models and models <= folders, (models, folders)
    mounts = {m["mountPath"] for c in pod_spec(activator)["containers"] for m in c["volumeMounts"]}
    assert str(args.model_repository) in mounts


# --- Istio -----------------------------------------------------------------------------------


def test_istio_routes_name_existing_hosts_and_subsets() -> None:
    rules = {d.body["spec"]["host"]: d for d in of(DESTINATION_RULE, "istio")}
    services = {s.name for s in of(SERVICE, "istio")}
    virtual = of(VIRTUAL_SERVICE, "istio")
    assert virtual and rules
    for doc in virtual:
        spec = doc.body["spec"]
        for host in spec["hosts"]:
            assert host.split(".")[0] in services, (doc.where, host)
        header_routes = []
        for route in spec["http"]:
            weights = [r.get("weight", 100) for r in route["route"]]
            assert sum(weights) == 100, (doc.where, route.get("name"), weights)
            assert route.get("timeout") and route.get("retries", {}).get("attempts"), route
            for destination in (r["destination"] for r in route["route"]):
                rule = rules.get(destination["host"])
                assert rule is not None, (doc.where, destination)
                subsets = {s["name"] for s in rule.body["spec"].get("subsets", [])}
                assert destination["subset"] in subsets, (doc.where, destination, subsets)
            if any("headers" in m for m in route.get("match", [])):
                header_routes.append(route)
        # The header sends everything to the canary; the unmatched rest is split 90/10.
        (by_header,) = header_routes
        assert by_header["match"][0]["headers"]["canary"] == {"exact": "true"}
        assert [(r["destination"]["subset"], r["weight"]) for r in by_header["route"]] == [
            ("canary", 100)
        ]
        rest = [r for r in spec["http"] if "match" not in r]
        assert len(rest) == 1 and spec["http"][-1] is rest[0]
        split = {r["destination"]["subset"]: r["weight"] for r in rest[0]["route"]}
        assert split == {"stable": 90, "canary": 10}, split


def test_destination_rule_subsets_select_pods_and_eject_failing_ones() -> None:
    services = {s.name: s for s in of(SERVICE, "istio")}
    for rule in of(DESTINATION_RULE, "istio"):
        spec = rule.body["spec"]
        service = services[spec["host"].split(".")[0]]
        for subset in spec["subsets"]:
            labels = {**service.body["spec"]["selector"], **subset["labels"]}
            pods = [d for d in of(DEPLOYMENT, "istio") if labels.items() <= pod_labels(d).items()]
            assert pods, (rule.where, subset)
        outlier = spec["trafficPolicy"]["outlierDetection"]
        assert outlier["consecutive5xxErrors"] > 0 and outlier["baseEjectionTime"], outlier
        pool = spec["trafficPolicy"]["connectionPool"]
        assert pool["tcp"]["maxConnections"] and pool["http"]["http1MaxPendingRequests"], pool


# --- KServe and Knative ----------------------------------------------------------------------


def is_raw(doc: Doc) -> bool:
    annotations: dict[str, str] = doc.body["metadata"].get("annotations", {})
    return annotations.get("serving.kserve.io/deploymentMode") == "RawDeployment"


@pytest.mark.parametrize("doc", of(ISVC), ids=lambda d: d.where)
def test_inference_service_names_a_runtime_that_serves_it(doc: Doc) -> None:
    runtimes = {d.name: d for d in of(CLUSTER_RUNTIME)}
    model = doc.body["spec"]["predictor"]["model"]
    runtime = runtimes.get(model["runtime"])
    assert runtime is not None, (doc.where, model["runtime"], sorted(runtimes))
    formats = {f["name"] for f in runtime.body["spec"]["supportedModelFormats"]}
    assert model["modelFormat"]["name"] in formats
    assert model["protocolVersion"] in runtime.body["spec"]["protocolVersions"]
    container = runtime_containers()[runtime.name]
    ports = container.get("ports", []) + model.get("ports", [])
    if is_raw(doc):
        assert {(p["name"], p["containerPort"]) for p in ports} >= {("http1", 8080), ("h2c", 8081)}
    else:
        # Knative admits one container port per revision.
        assert len(ports) <= 1, (doc.where, ports)
        assert all(p.get("name") in ("http1", "h2c") for p in ports), ports


def test_runtimes_serve_their_protocols_and_are_scraped_on_their_http_port() -> None:
    containers = runtime_containers()
    both = []
    for runtime in of(CLUSTER_RUNTIME):
        spec = runtime.body["spec"]
        annotations = spec["annotations"]
        assert annotations["serving.kserve.io/enable-prometheus-scraping"] == "true"
        assert annotations["prometheus.kserve.io/path"] == "/metrics"
        container = containers[runtime.name]
        args = parse(EmberCall(runtime.where, [str(a) for a in container["args"]]))
        assert int(annotations["prometheus.kserve.io/port"]) == args.http_port
        assert (args.model_dir, args.grpc_port) == ("/mnt/models", 8081)
        ports = {(p["name"], p["containerPort"]) for p in container.get("ports", [])}
        assert ("http1", args.http_port) in ports, (runtime.where, ports)
        # A protocol is declared only where its port is exposed.
        expected = ["v1", "v2", "grpc-v2"] if ("h2c", args.grpc_port) in ports else ["v1", "v2"]
        assert spec["protocolVersions"] == expected, runtime.where
        probe = container["readinessProbe"]["httpGet"]
        assert (probe["path"], probe["port"]) == ("/v2/health/ready", args.http_port)
        if len(ports) == 2:
            both.append(runtime.name)
    assert both, "no runtime exposes both the http1 and the h2c port"


def test_inference_service_examples_cover_kserve_features() -> None:
    predictors = {d.path.name: d.body["spec"]["predictor"] for d in of(ISVC)}
    serverless = [
        p
        for p in predictors.values()
        if p.get("minReplicas") == 0
        and p.get("containerConcurrency")
        and p.get("scaleMetric") == "concurrency"
    ]
    assert serverless, predictors
    assert any(p.get("canaryTrafficPercent") == 10 for p in predictors.values())
    assert any(is_raw(d) for d in of(ISVC))
    assert any("transformer" in d.body["spec"] for d in of(ISVC))


def test_knative_service_scales_to_zero_on_one_port() -> None:
    (service,) = of(KNATIVE_SERVICE)
    template = service.body["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    assert annotations["autoscaling.knative.dev/min-scale"] == "0"
    assert annotations["autoscaling.knative.dev/metric"] == "concurrency"
    assert (
        int(annotations["autoscaling.knative.dev/target"])
        <= template["spec"]["containerConcurrency"]
    )
    (container,) = template["spec"]["containers"]
    (port,) = container["ports"]
    args = parse(EmberCall(service.where, [str(a) for a in container["args"]]))
    assert port["containerPort"] == args.http_port
