"""The module tables a merge checks LoRAs against: built from the presets on the meta device, kept on disk, and the
same table whether built or read back (a damaged cache file is rebuilt)."""
import json

from lcmtool.lora import fit


def test_family_table_cached_on_disk_equals_a_fresh_build(tmp_path, monkeypatch):
    monkeypatch.setenv("LCMTOOL_CACHE", str(tmp_path))
    fit.family_shapes.cache_clear()
    built = fit.family_shapes("sd15")
    files = list((tmp_path / "modules").glob("sd15-*.json"))
    assert len(files) == 1
    assert built["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"] == (320, 768)
    assert built["text_encoder.text_model.encoder.layers.11.mlp.fc2"] == (768, 3072)  # one TE layout
    assert len([p for p in built if p.startswith("text_encoder.")]) == 12 * 6 + 0  # q k v out fc1 fc2 per layer
    fit.family_shapes.cache_clear()
    assert fit.family_shapes("sd15") == built  # read back from disk
    files[0].write_text("{broken")
    fit.family_shapes.cache_clear()
    assert fit.family_shapes("sd15") == built  # rebuilt
    assert json.loads(files[0].read_text())  # and rewritten
    fit.family_shapes.cache_clear()
