import json

from visualrwkv_hf.cli import main


def test_lm_demo_builds_saves_and_generates(tmp_path, capsys):
    output = tmp_path / "tiny"
    assert main(["lm-demo", "--output", str(output), "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out
    assert "Full recompute without cache gives the same tokens: True" in printed
    assert "Generated 6 tokens" in printed
    assert json.loads((output / "config.json").read_text())["model_type"] == "visualrwkv_text"
    assert (output / "tokenizer_config.json").exists()
