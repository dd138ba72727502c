"""Generate the NoisyStudentRun CustomResourceDefinition from the pydantic models.

The schema is made structural (every `$ref` inlined, `anyOf [X, null]` turned
into `nullable`, JSON-Schema-2020 keywords turned into their OpenAPI v3.0
forms), keeps the field descriptions (`kubectl explain`), defaults and the CEL
rules the models carry, and adds the status subresource and printer columns::

    noisy-student crd > crds/noisystudent.dev_noisystudentruns.yaml
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from . import api

CRD_FILE = f"{api.GROUP}_{api.PLURAL}.yaml"

_DROPPED = {"title", "additionalProperties", "$defs", "discriminator"}


def _inline(schema: dict[str, Any], defs: dict[str, Any]) -> Any:
    if isinstance(schema, list):
        return [_inline(item, defs) for item in schema]
    if not isinstance(schema, dict):
        return schema
    if "$ref" in schema:
        target = copy.deepcopy(defs[schema["$ref"].split("/")[-1]])
        merged = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        return _inline(merged, defs)
    return {key: _inline(value, defs) for key, value in schema.items()}


def _structural(schema: Any) -> Any:
    """Rewrite a JSON schema into a Kubernetes structural schema."""
    if isinstance(schema, list):
        return [_structural(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    schema = dict(schema)
    variants = schema.pop("anyOf", None)
    if variants is not None:
        non_null = [v for v in variants if v.get("type") != "null"]
        if schema.get("x-kubernetes-int-or-string"):
            pass  # `int | "auto"`: the marker alone describes it
        elif len(non_null) == 1:
            base = dict(non_null[0])
            base.update({k: v for k, v in schema.items() if k != "default" or v is not None})
            if len(non_null) < len(variants):
                base["nullable"] = True
            schema = base
        else:
            raise ValueError(f"cannot express anyOf {variants} in a structural schema")
    if "const" in schema:
        schema["enum"] = [schema.pop("const")]
    for bound in ("Minimum", "Maximum"):
        key = f"exclusive{bound}"
        if isinstance(schema.get(key), (int, float)) and not isinstance(schema[key], bool):
            schema[bound.lower()] = schema.pop(key)
            schema[key] = True
    if schema.get("default", "missing") is None:
        del schema["default"]
    for key in list(schema):
        keep_map = isinstance(schema[key], dict) and not schema.get("x-kubernetes-preserve-unknown-fields")
        if key in _DROPPED and not (key == "additionalProperties" and keep_map):
            # a map's value schema stays (`dict[str, str]`); `false`/`true` go, and so does the value
            # schema of a free-form map (modelArgs: its values are checked by the models, not the CRD)
            del schema[key]
    if "properties" in schema:
        schema["type"] = "object"
        schema["properties"] = {k: _structural(v) for k, v in schema["properties"].items()}
        required = schema.get("required")
        if required is not None:
            schema["required"] = sorted(required)
        _default_nested_objects(schema)
    if "items" in schema:
        schema["items"] = _structural(schema["items"])
    if "additionalProperties" in schema:
        schema["additionalProperties"] = _structural(schema["additionalProperties"])
    return schema


def _default_nested_objects(schema: dict[str, Any]) -> None:
    """Give optional object fields `default: {}` so the API server fills their defaults."""
    required = set(schema.get("required", ()))
    for name, prop in schema["properties"].items():
        if name in required or prop.get("type") != "object" or "default" in prop:
            continue
        if prop.get("nullable") and name != "randAugment":
            continue  # truly optional objects stay absent
        if not set(prop.get("required", ())):
            prop["default"] = _filled_default(prop)


def _filled_default(schema: dict[str, Any]) -> dict[str, Any]:
    """`{}`, or for an object with CEL rules its fields' defaults: the API server checks
    the rules against the default as written (`{}` has no `min` for `self.min <= self.max`)."""
    if "x-kubernetes-validations" not in schema:
        return {}
    return {name: prop["default"] for name, prop in schema.get("properties", {}).items() if "default" in prop}


def _schema_of(model: type[api.ApiModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation", ref_template="#/$defs/{model}")
    defs = raw.pop("$defs", {})
    return _structural(_inline(raw, defs))


def render_openapi_schema() -> dict[str, Any]:
    """The `openAPIV3Schema` of the CRD's only version."""
    spec = _schema_of(api.RunSpec)
    status = _schema_of(api.RunStatus)
    conditions = status["properties"]["conditions"]
    conditions["x-kubernetes-list-type"] = "map"
    conditions["x-kubernetes-list-map-keys"] = ["type"]
    status["properties"]["generations"]["x-kubernetes-list-type"] = "atomic"
    status["properties"]["jobs"]["x-kubernetes-list-type"] = "atomic"
    return {
        "type": "object",
        "description": api.NoisyStudentRun.__doc__.strip() if api.NoisyStudentRun.__doc__ else "",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
        "x-kubernetes-validations": [
            {
                "rule": f"size(self.metadata.name) <= {api.MAX_RUN_NAME}",
                "message": f"metadata.name must be at most {api.MAX_RUN_NAME} characters "
                "(child job names are derived from it)",
            },
            {
                "rule": f"self.metadata.name.matches('{api.DNS_LABEL_1035}')",
                "message": "metadata.name must be a DNS-1035 label: lowercase letters, digits and '-', "
                "starting with a letter and ending with a letter or digit",
            },
        ],
    }


def render_crd() -> dict[str, Any]:
    """The complete CustomResourceDefinition object."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{api.PLURAL}.{api.GROUP}"},
        "spec": {
            "group": api.GROUP,
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": [api.SHORT_NAME],
                "categories": [api.CATEGORY],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": "Generation", "type": "integer", "jsonPath": ".status.generation",
                         "description": "Generation in progress (0 = teacher)."},
                        {"name": "Stage", "type": "string", "jsonPath": ".status.stage",
                         "description": "Stage in progress."},
                        {"name": "Teacher-Top1", "type": "number", "jsonPath": ".status.teacherTop1",
                         "description": "Validation top-1 of the current teacher."},
                        {"name": "Progress", "type": "integer", "jsonPath": ".status.progress.percent",
                         "description": "Percent of the training (epochs) or label (images) stage in progress."},
                        {"name": "ETA", "type": "string", "jsonPath": ".status.progress.eta",
                         "description": "Estimated time until the training or label stage in progress ends."},
                        {"name": "Ready", "type": "string",
                         "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
                         "description": "True once every generation is trained."},
                        {"name": "Reason", "type": "string",
                         "jsonPath": '.status.conditions[?(@.type=="Ready")].reason',
                         "description": "Why the run is (not) ready: see docs/lifecycle.md."},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {"openAPIV3Schema": render_openapi_schema()},
                }
            ],
        },
    }


def render_crd_yaml() -> str:
    header = "# Generated by `noisy-student crd` from noisy_student_operator.api; do not edit.\n"
    return header + yaml.safe_dump(render_crd(), sort_keys=False, width=100)
