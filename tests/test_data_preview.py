"""`shardtune data preview`: composes like `train`, marks trained tokens, prints statistics."""
from __future__ import annotations

from launcher.data_cmd import main


def test_preview_marks_trained_tokens_and_prints_statistics(tmp_path, capsys):
    code = main(["preview", "-n", "2", "--no-color", "data.train_files=[tests/fixtures/data/messages.jsonl]",
                 "data.eval_files=[]", "data.packing=true", f"data.cache_dir={tmp_path}"])
    out = capsys.readouterr().out
    assert code == 0
    assert "[[Blue.<|im_end|>\n]]" in out and "<|im_start|>user\nName a colour.<|im_end|>" in out
    assert "rows            1" in out and "documents       4" in out  # 4 documents packed into one row
    assert "------ next document (positions restart at 0) ------" in out
    assert "packing         1 rows x 256 = 256 slots, 98.8% filled" in out  # 253 tokens in a row of 256


def test_preview_reports_bad_input_with_file_and_line(tmp_path, capsys):
    code = main(["preview", "data.train_files=[tests/fixtures/data/bad/assistant_first.jsonl]", "data.eval_files=[]",
                 f"data.cache_dir={tmp_path}"])
    assert code == 2
    assert "bad/assistant_first.jsonl:2: message 0: assistant turn before any user turn" in capsys.readouterr().err
