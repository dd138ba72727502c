"""The CRD in crds/ is generated from the API models and must not go stale."""

from pathlib import Path

import yaml

from noisy_student_operator.crd import CRD_FILE, render_crd, render_crd_yaml

ROOT = Path(__file__).resolve().parents[2]


def test_crd_file_is_up_to_date():
    committed = (ROOT / "crds" / CRD_FILE).read_text()
    assert committed == render_crd_yaml(), "crds/ is stale: run `noisy-student crd --output-file crds/" + CRD_FILE + "`"


def walk(schema, path="$"):
    yield path, schema
    for name, prop in schema.get("properties", {}).items():
        yield from walk(prop, f"{path}.{name}")
    if "items" in schema:
        yield from walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk(schema["additionalProperties"], f"{path}{{}}")


def test_schema_is_structural_and_described():
    crd = render_crd()
    version = crd["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    for path, node in walk(schema["properties"]["spec"], "spec"):
        assert "type" in node or node.get("x-kubernetes-int-or-string"), path
        for banned in ("$ref", "anyOf", "allOf", "oneOf", "title", "const"):
            assert banned not in node, f"{path} has {banned}"
        # Only maps (`dict[str, str]`) keep additionalProperties: a value schema, never true/false.
        assert isinstance(node.get("additionalProperties", {}), dict), f"{path} has additionalProperties"
        assert "properties" not in node or "additionalProperties" not in node, path
        assert node.get("description") or path.endswith("{}"), f"{path} has no description (kubectl explain)"
    assert version["subresources"] == {"status": {}}
    assert crd["spec"]["names"]["shortNames"] == ["nsr"]
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Generation", "Stage", "Teacher-Top1", "Progress", "ETA", "Ready", "Reason", "Age"]
    # The teacher is the latest trained model, not the best (a later generation may score lower).
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert "the latest trained model" in status["teacherTop1"]["description"]
    assert "not necessarily the best" in status["teacherTop1"]["description"]


def test_defaults_and_cel_rules_are_carried():
    schema = render_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    spec = schema["properties"]["spec"]["properties"]
    threshold = spec["pseudoLabels"]["properties"]["confidenceThreshold"]
    assert threshold["default"] == 0.3 and threshold["minimum"] == 0 and threshold["maximum"] == 1
    assert spec["pseudoLabels"]["default"] == {}
    assert spec["pseudoLabels"]["properties"]["imagesPerClass"]["x-kubernetes-int-or-string"] is True
    rules = [r["rule"] for r in spec["resources"]["properties"]["nodes"]["x-kubernetes-validations"]]
    assert rules == ["self.min <= self.max"]
    assert spec["data"]["x-kubernetes-validations"]
    conditions = schema["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert yaml.safe_load(render_crd_yaml())["kind"] == "CustomResourceDefinition"
