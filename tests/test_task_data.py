"""scripts/build_task_data.py: the real tasks come out in the formats the fine-tuning readers take."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from build_task_data import CHAPTERS, build_hkcancor_ner, build_kjv_sections, section_of_chapter  # noqa: E402

from lmlab.finetune import read_conll, read_table  # noqa: E402


def test_kjv_sections_is_a_six_way_task_split_by_chapter(tmp_path):
    assert sum(CHAPTERS) == 1189 and len(CHAPTERS) == 66
    labels = section_of_chapter()
    assert labels[0] == "law" and labels[49 + 1] == "law" and labels[-1] == "letters"
    assert labels.index("gospels") == 929  # Matthew 1 follows the 929 chapters of the Old Testament
    counts = build_kjv_sections(tmp_path, per_chapter=2)
    assert counts["train"] > 8 * counts["test"] > 0
    train, _, _ = read_table(tmp_path / "kjv-sections" / "train.tsv")
    test, _, _ = read_table(tmp_path / "kjv-sections" / "test.tsv")
    assert {e.label for e in train} == {"law", "history", "wisdom", "prophets", "gospels", "letters"}
    assert not {e.texts[0] for e in train} & {e.texts[0] for e in test}


def test_hkcancor_names_become_entities(tmp_path):
    cha = (
        "@UTF8\n*XXA:\t陳 生 去咗 香港 同 九龍 .\n%mor:\tnr|can4 nr|saang1 v|heoi3zo2 ns|hoeng1gong2\n"
        "\tc|tung4 ns|gau2lung4 .\n*XXB:\t好 啊 .\n%mor:\ta|hou2 y|aa3 .\n"
    )
    with zipfile.ZipFile(tmp_path / "pycantonese-5.0.0-test.whl", "w") as z:
        for k in range(10):  # file 0 goes to test, file 5 to dev, the rest to train
            z.writestr(f"pycantonese/data/hkcancor/F{k}.cha", cha)
    counts = build_hkcancor_ner(tmp_path / "out", cache=tmp_path)
    assert counts == {"train": 16, "dev": 2, "test": 2}  # each file: 1 utterance with names + 1 without
    sentences = read_conll(tmp_path / "out" / "hkcancor-ner" / "test.conll")
    named = next(s for s in sentences if "香港" in s.words)
    assert named.label == ["B-PER", "I-PER", "O", "B-LOC", "O", "B-LOC", "O"]
