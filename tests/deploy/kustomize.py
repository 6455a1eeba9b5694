"""A small Kustomize renderer for the subset deploy/k8s uses, so that tests can check the
overlays as `kubectl apply -k` would build them, without a kustomize binary.

Supported, with Kustomize's meaning and order (resources, generators, patches, then the
namespace, label and image transformers; a base is built whole before its overlay's
patches apply):

* ``resources``: files (multi-document YAML) and folders with a kustomization.yaml;
* ``configMapGenerator`` with ``files`` (key: the file name, or ``key=path``), only with
  ``generatorOptions.disableNameSuffixHash: true`` (the name-hash suffix is not rendered);
* ``patches`` with ``path`` or inline ``patch``: strategic-merge patches, the target
  named by the patch's own kind and metadata.name. Maps merge; ``null`` deletes a key;
  lists merge by their Kubernetes patch merge key (containers, initContainers, env and
  volumes by name, volumeMounts by mountPath, container ports by containerPort) and every
  other list is replaced, as in Kubernetes' strategic merge for these fields;
* ``namespace``: set on every namespaced resource;
* ``labels`` with ``pairs`` and ``includeTemplates`` (``includeSelectors`` must be false);
* ``images``: ``newName``/``newTag``/``digest`` for containers whose image name matches.

Anything else in a kustomization.yaml is an error, so that the tests never silently
render less than kubectl would.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "configMapGenerator", "generatorOptions", "patches",
                  "namespace", "labels", "images"}
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass",
                  "CustomResourceDefinition", "PriorityClass", "ValidatingWebhookConfiguration",
                  "MutatingWebhookConfiguration"}
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}


class KustomizeError(ValueError):
    """The kustomization uses something this renderer does not, or is inconsistent."""


def _load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _merge_key(field: str, items: list) -> str | None:
    if field == "ports":
        if all(isinstance(i, dict) and "containerPort" in i for i in items):
            return "containerPort"
        return None
    return MERGE_KEYS.get(field)


def strategic_merge(base: Any, patch: Any, field: str = "") -> Any:
    """``patch`` merged into a copy of ``base`` (Kubernetes strategic merge, the subset above)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = copy.deepcopy(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = strategic_merge(out[key], value, key)
            else:
                out[key] = copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(patch, list):
        key = _merge_key(field, base + patch)
        if key is None:
            return copy.deepcopy(patch)
        out = copy.deepcopy(base)
        for item in patch:
            at = next((i for i, b in enumerate(out) if b.get(key) == item.get(key)), None)
            if at is None:
                out.append(copy.deepcopy(item))
            else:
                out[at] = strategic_merge(out[at], item, "")
        return out
    return copy.deepcopy(patch)


def _pod_spec(resource: dict) -> dict | None:
    if resource.get("kind") in WORKLOADS:
        return resource.get("spec", {}).get("template", {}).get("spec")
    if resource.get("kind") == "Pod":
        return resource.get("spec")
    return None


def _set_image(container: dict, images: list[dict]) -> None:
    image = container.get("image", "")
    name = image.split("@", 1)[0]
    if ":" in name.rsplit("/", 1)[-1]:
        name = name.rsplit(":", 1)[0]
    for entry in images:
        if entry["name"] != name:
            continue
        new = entry.get("newName", name)
        if "digest" in entry:
            container["image"] = f"{new}@{entry['digest']}"
        elif "newTag" in entry:
            container["image"] = f"{new}:{entry['newTag']}"
        else:
            tail = image[len(name):]
            container["image"] = new + tail


def _generate_config_maps(folder: Path, k: dict) -> list[dict]:
    generators = k.get("configMapGenerator", [])
    if generators and not k.get("generatorOptions", {}).get("disableNameSuffixHash"):
        raise KustomizeError(f"{folder}: configMapGenerator needs generatorOptions.disableNameSuffixHash: true here "
                             "(this renderer does not compute the name-hash suffix)")
    out = []
    for g in generators:
        unknown = set(g) - {"name", "files"}
        if unknown:
            raise KustomizeError(f"{folder}: configMapGenerator {g.get('name')}: unsupported keys {sorted(unknown)}")
        data = {}
        for spec in g.get("files", []):
            key, _, rel = spec.rpartition("=") if "=" in spec else (Path(spec).name, "", spec)
            data[key] = (folder / rel).read_text()
        out.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": g["name"]}, "data": data})
    return out


def _apply_patch(resources: list[dict], patch: dict, where: str) -> None:
    kind, name = patch.get("kind"), patch.get("metadata", {}).get("name")
    hits = [i for i, r in enumerate(resources) if r["kind"] == kind and r["metadata"]["name"] == name]
    if len(hits) != 1:
        raise KustomizeError(f"{where}: the patch targets {kind}/{name}, which matches {len(hits)} resources")
    resources[hits[0]] = strategic_merge(resources[hits[0]], patch)


def build(folder: str | Path) -> list[dict]:
    """The resources ``folder``'s kustomization.yaml renders to."""
    folder = Path(folder)
    k = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(k) - SUPPORTED_KEYS
    if unknown:
        raise KustomizeError(f"{folder}/kustomization.yaml: unsupported keys {sorted(unknown)}")
    resources: list[dict] = []
    for entry in k.get("resources", []):
        path = folder / entry
        resources += build(path) if path.is_dir() else _load_docs(path)
    resources += _generate_config_maps(folder, k)
    for p in k.get("patches", []):
        if set(p) - {"path", "patch"}:
            raise KustomizeError(f"{folder}: patches support only path or patch, got {sorted(p)}")
        docs = _load_docs(folder / p["path"]) if "path" in p else [d for d in yaml.safe_load_all(p["patch"]) if d]
        for doc in docs:
            _apply_patch(resources, doc, str(folder))
    if "namespace" in k:
        for r in resources:
            if r["kind"] not in CLUSTER_SCOPED:
                r["metadata"]["namespace"] = k["namespace"]
    for entry in k.get("labels", []):
        if entry.get("includeSelectors"):
            raise KustomizeError(f"{folder}: labels with includeSelectors are not supported here")
        for r in resources:
            r["metadata"].setdefault("labels", {}).update(entry["pairs"])
            if entry.get("includeTemplates") and r["kind"] in WORKLOADS:
                template = r["spec"]["template"].setdefault("metadata", {})
                template.setdefault("labels", {}).update(entry["pairs"])
    for r in resources:
        spec = _pod_spec(r)
        if spec is not None:
            for c in [*spec.get("containers", []), *spec.get("initContainers", [])]:
                _set_image(c, k.get("images", []))
    names = [(r["kind"], r["metadata"].get("namespace"), r["metadata"]["name"]) for r in resources]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise KustomizeError(f"{folder}: duplicate resources {sorted(map(str, dupes))}")
    return resources
