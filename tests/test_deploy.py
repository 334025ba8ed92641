"""The Kubernetes manifests and the compose file, checked against their schemas and the config.

No cluster runs here: every manifest is validated against the Kubernetes API's own OpenAPI
schemas (kubernetes-validate bundles them per release, strict: unknown fields fail), and
compose.yaml against the Compose Specification's JSON Schema (the copy check-jsonschema
vendors). Then the parts that must agree with the gateway are held to it: the config the pods
mount parses with the gateway's own loader, the probes and scrape annotations name the ports
and paths that config serves, every secret variable the config names comes from the Secret,
and the grace period covers the drain.
"""

from __future__ import annotations

import json
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from gateway.config import Config, parse_config

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
# The oldest Kubernetes minor still maintained upstream, and the newest the bundled schemas know.
K8S_VERSIONS = ("1.32.0", kubernetes_validate.latest_version())
SECRET_NAME = "onesignal-gateway"


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _manifests() -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in _docs(path):
            if doc.get("kind") != "Kustomization":
                out.append((path, doc))
    return out


def _by_kind(kind: str, name: str, where: Path = K8S) -> dict[str, Any]:
    """The one ``kind`` called ``name`` among the manifests directly in ``where``."""
    found = [
        d
        for path, d in _manifests()
        if path.parent == where and d["kind"] == kind and d["metadata"]["name"] == name
    ]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def _config(name: str = "onesignal-gateway", where: Path = K8S) -> Config:
    cm = _by_kind("ConfigMap", name, where)
    secret = _by_kind("Secret", SECRET_NAME)
    return parse_config(tomllib.loads(cm["data"]["gateway.toml"]), secret["stringData"])


def _container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _port(container: dict[str, Any], name_or_number: str | int) -> int:
    if isinstance(name_or_number, int):
        return name_or_number
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    return int(ports[name_or_number])


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_is_valid_for_kubernetes(version: str) -> None:
    manifests = _manifests()
    assert len(manifests) >= 12, "the manifests were not found"
    for path, doc in manifests:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(
                f"{path.relative_to(ROOT)}: {doc['kind']} {doc['metadata']['name']}: {exc.message}"
            )


def test_strict_validation_catches_a_misspelt_field() -> None:
    # the validator is really strict: a typo in a probe would otherwise pass silently
    deployment = json.loads(json.dumps(_by_kind("Deployment", "gateway-ingress")))
    probe = _container(deployment)["readinessProbe"]
    probe["periodSecond"] = probe.pop("periodSeconds")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


def test_kustomization_lists_every_resource_file_but_the_secret_example() -> None:
    kustomization = _docs(K8S / "kustomization.yaml")[0]
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk - {"secret.example.yaml"}
    # the real Secret is made by the operator, never applied from the repository
    assert "secret.example.yaml" not in listed


def test_the_mounted_config_parses_and_every_secret_comes_from_the_secret() -> None:
    config = _config()
    secret_keys = set(_by_kind("Secret", SECRET_NAME)["stringData"])
    wanted = {s.secrets_env for s in config.sources if s.secrets_env}
    wanted |= {a.api_key_env for a in config.onesignal.apps if a.api_key_env}
    assert wanted and wanted <= secret_keys
    for name in ("gateway-ingress", "gateway-tag-sync"):
        container = _container(_by_kind("Deployment", name))
        refs = [e["secretRef"]["name"] for e in container.get("envFrom", [])]
        assert refs == [SECRET_NAME], name
        env = {e["name"]: e.get("value") for e in container["env"]}
        mount = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}["config"]
        assert env["GATEWAY_CONFIG"] == f"{mount}/gateway.toml"


def test_ingress_probes_ports_and_scrape_follow_the_config() -> None:
    config = _config()
    deployment = _by_kind("Deployment", "gateway-ingress")
    container = _container(deployment)
    assert container["args"] == ["serve"]
    assert _port(container, "http") == config.server.port
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert _port(container, container[probe]["httpGet"]["port"]) == config.server.port
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    # metrics have a port of their own, which the Service does not publish
    assert int(annotations["prometheus.io/port"]) == config.server.metrics_port
    assert _port(container, "metrics") == config.server.metrics_port
    assert config.server.metrics_host not in ("127.0.0.1", "::1"), "a scraper cannot reach it"
    service = _by_kind("Service", "gateway-ingress")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    # the load balancer's Service reaches the webhook port only
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]


def test_the_grace_period_covers_the_prestop_pause_and_the_drain() -> None:
    config = _config()
    ingress = _by_kind("Deployment", "gateway-ingress")
    container = _container(ingress)
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pause = float(command[1])
    # Kubernetes removes a terminating pod from the endpoints at once, but the load balancer
    # learns it some seconds later: the pause keeps uvicorn accepting until it has
    assert pause >= 5
    # uvicorn drains for graceful_shutdown_s, then the producer flushes for up to 15 s
    flush = min(15.0, config.server.graceful_shutdown_s or 15.0)
    drain = pause + config.server.graceful_shutdown_s + flush
    assert ingress["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > drain
    tag_sync = _by_kind("Deployment", "gateway-tag-sync")
    grace = tag_sync["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > config.tag_sync.shutdown_timeout_s
    # a rolling update never takes a ready ingress away before its successor is ready
    assert ingress["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_tag_sync_liveness_and_scrape_use_its_metrics_port() -> None:
    config = _config()
    deployment = _by_kind("Deployment", "gateway-tag-sync")
    container = _container(deployment)
    assert container["args"] == ["tag-sync"]
    assert config.tag_sync.metrics_port > 0
    assert (
        _port(container, container["livenessProbe"]["httpGet"]["port"])
        == config.tag_sync.metrics_port
    )
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == config.tag_sync.metrics_port
    assert config.tag_sync.metrics_host not in ("127.0.0.1", "::1"), "a scraper cannot reach it"
    # more consumers than partitions sit idle
    assert deployment["spec"]["replicas"] <= config.topics.partitions


def test_disruption_budgets_and_autoscaler_select_their_workloads() -> None:
    for name in ("gateway-ingress", "gateway-tag-sync"):
        labels = _by_kind("Deployment", name)["spec"]["template"]["metadata"]["labels"]
        pdb = _by_kind("PodDisruptionBudget", name)
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = _by_kind("HorizontalPodAutoscaler", "gateway-ingress")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "gateway-ingress")
    # an HPA on CPU needs a CPU request to compute utilisation against
    requests = _container(_by_kind("Deployment", "gateway-ingress"))["resources"]["requests"]
    assert "cpu" in requests
    # the PDB must let a node drain: fewer pods required than the HPA's floor
    assert (
        _by_kind("PodDisruptionBudget", "gateway-ingress")["spec"]["minAvailable"]
        < hpa["spec"]["minReplicas"]
    )


def _compose_schema() -> dict[str, Any]:
    vendor = (
        resources.files("check_jsonschema") / "builtin_schemas" / "vendor" / "compose-spec.json"
    )
    return json.loads(vendor.read_text())


def test_compose_file_follows_the_compose_specification() -> None:
    schema = _compose_schema()
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    errors = sorted(validator_cls(schema).iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_compose_schema_catches_a_wrong_field() -> None:
    schema = _compose_schema()
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    compose["services"]["gateway"]["restart_policy"] = "always"  # not a service field
    assert list(jsonschema.validators.validator_for(schema)(schema).iter_errors(compose))


SPOOL = K8S / "spool"


def test_the_spool_overlay_gives_each_replica_a_volume_of_its_own() -> None:
    kustomization = _docs(SPOOL / "kustomization.yaml")[0]
    assert set(kustomization["resources"]) == {p.name for p in SPOOL.glob("*.yaml")} - {
        "kustomization.yaml"
    }
    config = _config("onesignal-gateway-spool", SPOOL)
    assert config.spool.enabled and config.server.workers == 1
    sts = _by_kind("StatefulSet", "gateway-ingress-spool", SPOOL)
    pod = sts["spec"]["template"]["spec"]
    container = _container(sts)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    # the spool lives on the claim template's volume, not on an emptyDir that dies with the pod
    assert mounts["spool"] == config.spool.dir
    assert "spool" not in {v["name"] for v in pod["volumes"]}
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "spool"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    storage = claim["spec"]["resources"]["requests"]["storage"]
    assert storage.endswith("Mi") and int(storage[:-2]) * 2**20 >= 1.2 * config.spool.max_bytes
    # scaling down must not delete what a replica spooled
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"]["whenScaled"] == "Retain"
    assert {v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v} == {
        "onesignal-gateway-spool"
    }
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    # the same probes, ports and drain bound as the stateless ingress
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert _port(container, "metrics") == config.server.metrics_port
    flush = min(15.0, config.server.graceful_shutdown_s or 15.0)
    pause = float(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] > pause + config.server.graceful_shutdown_s + flush
    assert sts["spec"]["serviceName"] == "gateway-ingress-spool"
    governing = _by_kind("Service", "gateway-ingress-spool", SPOOL)
    assert governing["spec"]["clusterIP"] == "None"
    labels = sts["spec"]["template"]["metadata"]["labels"]
    for service in (governing, _by_kind("Service", "gateway-ingress", SPOOL)):
        assert service["spec"]["selector"].items() <= labels.items()
