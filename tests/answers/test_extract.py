from care_ext.answers.extract import as_text, last_braced_command, last_tag_block


def test_last_box_is_taken_with_nested_braces():
    r = "first \\boxed{3} then \\boxed{\\frac{1}{\\sqrt{2}}} end"
    assert last_braced_command(r) == "\\frac{1}{\\sqrt{2}}"


def test_fbox_and_unbraced_box():
    assert last_braced_command("\\boxed{1} and \\fbox{x+1}") == "x+1"
    assert last_braced_command("so \\boxed 5$.") == "5"


def test_whitespace_before_the_argument_is_skipped_newlines_included():
    # math-verify reads 5 from the first two; LaTeX reads 5 from all four
    for r in ("$\\boxed \n 5$.", "so \\boxed\n5", "so \\boxed\n{5}", "\\boxed \n\t {5} end"):
        assert last_braced_command(r) == "5", r
    assert last_braced_command("\\boxed{3} and \\boxed \n 7") == "7"
    assert last_braced_command("the end: \\boxed \n ") is None


def test_truncated_or_missing_box_is_none():
    assert last_braced_command("\\boxed{\\frac{1}{2}") is None
    assert last_braced_command("the answer is 5") is None


def test_escaped_braces_do_not_close_the_box():
    assert last_braced_command("\\boxed{\\{1,2\\}}") == "\\{1,2\\}"


def test_longer_command_names_are_not_boxes():
    assert last_braced_command("\\boxed{7} \\boxedfoo{8}") == "7"


def test_last_answer_tag():
    t = "<answer>a</answer> more <answer> Zoey is a knight </answer> <answer>unclosed"
    assert last_tag_block(t, "answer") == "Zoey is a knight"
    assert last_tag_block("<answer>only open", "answer") is None


def test_as_text_handles_bytes_surrogates_and_non_text():
    assert as_text(b"\\boxed{5}\xff\xfe") == "\\boxed{5}\ufffd\ufffd"
    bad = b"\\boxed{7}\xff".decode("utf-8", "surrogateescape")
    out = as_text(bad)
    out.encode("utf-8")  # no lone surrogates left
    assert out.startswith("\\boxed{7}")
    assert as_text(None) is None and as_text(12) is None
