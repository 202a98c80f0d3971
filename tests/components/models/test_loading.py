

def test_kept_models_are_reused_per_kind_and_key_and_only_on_a_cpu(tmp_path):
    from components.models import loading
    from components.models.loading import content_stamp, kept_model

    loads = []

    def load(name):
        def make():
            loads.append(name)
            return object()
        return make

    loading._KEPT.clear()
    a = kept_model("policy", ("a",), "cpu", load("a"), keep=2)
    b = kept_model("policy", ("b",), "cpu", load("b"), keep=2)
    assert kept_model("policy", ("a",), "cpu", load("a"), keep=2) is a  # the aligned node's reference
    assert kept_model("policy", ("c",), "cpu", load("c"), keep=2) is not b  # b was the older: dropped
    assert kept_model("policy", ("b",), "cpu", load("b"), keep=2) is not b
    assert loads == ["a", "b", "c", "b"] and len(loading._KEPT["policy"]) == 2
    assert kept_model("reward", ("a",), "cpu", load("r")) is not a  # kinds apart
    first = kept_model("policy", ("g",), "cuda", load("g"))
    assert kept_model("policy", ("g",), "cuda", load("g")) is not first and "policy" not in loading._KEPT
    loading._KEPT.clear()
    # The key follows the files: an adapter written anew differs.
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"12")
    before = content_stamp([adapter])
    (adapter / "adapter_model.safetensors").write_bytes(b"123")
    assert content_stamp([adapter]) != before
