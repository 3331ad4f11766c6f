"""bench/perfdoc.py: each benchmark rewrites only its own `## ` section of a results document."""

from bench.perfdoc import HEADER, update_section


def test_a_section_is_replaced_in_place_and_the_others_are_kept(tmp_path):
    doc = tmp_path / "performance.md"
    update_section(doc, "Shard packing", "old packing numbers")
    assert doc.read_text().startswith(HEADER)  # a new document starts with the header
    update_section(doc, "Data pipeline", "pipeline numbers\n\n| a | b |\n")
    update_section(doc, "Shard packing", "new packing numbers")
    text = doc.read_text()
    assert "old packing numbers" not in text and "new packing numbers" in text
    assert text.index("## Shard packing") < text.index("## Data pipeline")  # replaced where it was
    assert "| a | b |" in text and text.count("## ") == 2 and text.endswith("\n")


def test_a_title_with_regex_characters_matches_only_itself(tmp_path):
    doc = tmp_path / "quality.md"
    doc.write_text("# Quality\n\n## Results (full scale)\n\nfull table\n\n## Results (smoke scale)\n\nsmoke table\n")
    update_section(doc, "Results (smoke scale)", "new smoke table")
    text = doc.read_text()
    assert "full table" in text and "new smoke table" in text and "\nsmoke table" not in text
