"""The frame benchmark runs and writes its results (a smoke run: tiny repeats, no timing asserted)."""
import json

from bench import bench_frame


def test_bench_frame_writes_json_and_a_markdown_table(tmp_path, capsys):
    assert bench_frame.main(["--repeats", "2", "--min-time", "0.001", "--cuts", "pool2,dense2",
                             "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "frame.json").read_text())
    assert report["machine"]["numpy"] and report["settings"]["repeats"] == 2
    assert [c["cut"] for c in report["cuts"]] == ["pool2", "dense2"]
    pool2 = report["cuts"][0]
    assert pool2["tensor_bytes"] == 3136
    assert {(v["compress"], v["signed"]) for v in pool2["variants"]} == set(bench_frame.VARIANTS)
    raw = pool2["variants"][0]
    assert (raw["compress"], raw["signed"]) == ("raw", False)
    assert raw["payload_bytes"] == 3136 + raw["header_bytes"] and raw["header_bytes"] <= 64
    assert pool2["json_float32"]["payload_bytes"] > 10 * raw["payload_bytes"]  # the naive split's cost
    table = (tmp_path / "frame.md").read_text()
    assert "| pool2 | 7×7×64 | raw signed |" in table and "JSON float32" in table and "Targets:" in table
    assert "| pool2 | 7×7×64 | raw |" in capsys.readouterr().out
