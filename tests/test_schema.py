"""Schema: YAML round trip, errors that name the field, and inference from a small CSV."""

from __future__ import annotations

import pytest

from ctrkit.schema import Field, Schema, SchemaError, infer_schema


def _schema() -> Schema:
    return Schema(
        fields=[Field("user", min_count=3), Field("item", hash_buckets=1000),
                Field("price", kind="numeric", transform="standardize"),
                Field("age", kind="numeric", transform="bucketize", n_buckets=8)],
        label="click", time="ts", group="user", columns=["ts", "user", "item", "price", "age", "click", "junk"])


def test_yaml_round_trip_keeps_everything(tmp_path):
    s = _schema()
    path = tmp_path / "schema.yaml"
    s.save(path)
    back = Schema.load(path)
    assert back == s
    assert back.fingerprint() == s.fingerprint()
    assert [f.name for f in back.sparse_fields] == ["user", "item", "age"]
    assert [f.name for f in back.dense_fields] == ["price"]


def test_yaml_is_short_and_fields_may_be_bare_names():
    text = "label: y\nfields: [a, {name: b, kind: numeric}]\n"
    s = Schema.from_yaml(text)
    assert [f.kind for f in s.fields] == ["categorical", "numeric"]
    assert "min_count" not in s.to_yaml()


@pytest.mark.parametrize("item, needle", [
    ({"name": "price", "kind": "number"}, "'price'"),
    ({"name": "price", "kind": "numeric", "transform": "sqrt"}, "'price'"),
    ({"name": "user", "min_count": 0}, "'user'"),
    ({"name": "user", "hash_buckets": 0}, "'user'"),
    ({"name": "age", "kind": "numeric", "n_buckets": 1}, "'age'"),
    ({"name": "user", "colour": "red"}, "'user'"),
])
def test_errors_name_the_field(item, needle):
    with pytest.raises(SchemaError, match=needle):
        Schema.from_dict({"label": "y", "fields": [item]})


def test_schema_level_errors():
    with pytest.raises(SchemaError, match="unknown keys"):
        Schema.from_dict({"label": "y", "fields": ["a"], "feilds": []})
    with pytest.raises(SchemaError, match="duplicate"):
        Schema(fields=[Field("a"), Field("a")], label="y")
    with pytest.raises(SchemaError, match="label"):
        Schema(fields=[Field("y")], label="y")
    with pytest.raises(SchemaError, match=r"\['b'\]"):
        Schema(fields=[Field("a"), Field("b")], label="y", columns=["y", "a"])
    with pytest.raises(SchemaError, match="not valid YAML"):
        Schema.from_yaml("label: [")
    with pytest.raises(SchemaError, match="no field 'zz'"):
        _schema().field("zz")


def test_load_missing_file(tmp_path):
    with pytest.raises(SchemaError, match="does not exist"):
        Schema.load(tmp_path / "nope.yaml")


@pytest.mark.parametrize("body, said", [
    ("label: y\nfields:\n- {name: a, kind: numerc}\n", "field 'a': kind must be one of"),
    ("label: y\nfields:\n- {name: a, kind: numeric, transform: bucketize, n_buckets: 1}\n", "n_buckets must be >= 2"),
    ("label: y\nfields:\n- a\n- a\n", "duplicate field names: ['a']"),
])
def test_a_bad_schema_file_is_named_with_what_is_wrong_in_it(tmp_path, body, said):
    """A field's or the schema's own check named what was wrong, not the file it was in."""
    path = tmp_path / "s.yaml"
    path.write_text(body)
    with pytest.raises(SchemaError) as err:
        Schema.load(path)
    assert str(err.value).startswith(f"{path}: ") and said in str(err.value)


def test_infer_schema_on_small_csv(tmp_path):
    rows = ["timestamp,user_id,city,price,n_views,click"]
    for i in range(200):
        rows.append(f"2026-01-01T00:{i % 60:02d}:00,u{i % 17},c{i % 3},{i * 1.5:.2f},{(i * 7) % 120},{i % 2}")
    path = tmp_path / "log.csv"
    path.write_text("\n".join(rows) + "\n")
    s = infer_schema(path)
    assert s.label == "click"
    assert s.time == "timestamp"
    assert s.group == "user_id"
    kinds = {f.name: f.kind for f in s.fields}
    assert kinds == {"user_id": "categorical", "city": "categorical", "price": "numeric", "n_views": "numeric"}
    assert s.field("price").transform == "log1p_standardize"


def test_infer_schema_needs_a_label(tmp_path):
    path = tmp_path / "nolabel.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(SchemaError, match="--label"):
        infer_schema(path)
    with pytest.raises(SchemaError, match="'zz' not found"):
        infer_schema(path, label="zz")
