"""``bnlab report`` over folders it does not control (issue 26, items 9 and 10): links are not
followed, folder names are text, a report that is not UTF-8 is one line."""

from __future__ import annotations

import os
import re

from bnlab import cli
from bnlab.experiments.report import build_report


def write_report(folder, text="# Report\n"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.md").write_text(text)
    return folder / "report.md"


def test_a_linked_report_or_folder_is_not_followed(tmp_path, capsys):
    secret = tmp_path / "private" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("# the private key\n")
    os.chmod(secret, 0o600)
    exp = tmp_path / "exp"
    write_report(exp / "lr", "# LR\n")
    (exp / "linked").mkdir()
    (exp / "linked" / "report.md").symlink_to(secret)
    (exp / "folder").symlink_to(secret.parent)
    os.symlink("secret.txt", secret.parent / "report.md")  # exp/folder/report.md -> the secret
    out, gathered = build_report([exp], tmp_path / "report.md")
    assert gathered == [exp / "lr" / "report.md"]
    assert "private key" not in out.read_text()
    err = capsys.readouterr().err
    linked = exp / "linked" / "report.md"
    assert f"{linked} left out: {linked} is a symbolic link" in err
    assert f"{exp / 'folder' / 'report.md'} left out: {exp / 'folder'} is a symbolic link" in err


def test_folder_names_go_into_the_report_as_text(tmp_path):
    exp = tmp_path / "exp"
    names = ['x"><img src=x onerror=alert(1)>', "a](javascript:alert(1))", "lr"]
    for name in names:
        write_report(exp / name)
    out, gathered = build_report([exp], tmp_path / "report.md")
    text = out.read_text()
    assert len(gathered) == 3
    assert "<img" not in text and not re.search(r"(?<!\\)\]\(javascript", text)
    assert "- [x&quot;&gt;&lt;img src=x onerror=alert(1)&gt;](#x---img-src-x-onerror-alert-1--)" in text
    assert '<a id="x---img-src-x-onerror-alert-1--"></a>' in text
    assert "- [a\\](javascript:alert(1))](#a--javascript-alert-1--)" in text
    assert "- [lr](#lr)" in text and '<a id="lr"></a>' in text


def test_a_report_that_is_not_utf8_is_one_line_and_nothing_is_written(tmp_path, capsys):
    exp = tmp_path / "exp"
    write_report(exp / "lr")
    bad = exp / "zeta" / "report.md"
    bad.parent.mkdir()
    bad.write_bytes(b"# Zeta \xff\xfe\n")
    out = tmp_path / "report.md"
    assert cli.main(["report", "--runs", str(exp), "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"bnlab: error: {bad}: not UTF-8 text (byte 0xff at offset "
                                       "7); delete it, or run its experiment again to rewrite it\n")
    assert not out.exists()
