"""AUTOMATIC1111's prompt syntax (`sd_scratch/prompts.py`): every example of A1111's own docstrings in
`modules/prompt_parser.py`, and our own cases with their answers worked out by hand.

A1111's answers were also checked against its parser (lark 1.1.2, the version it pins) while this was written;
where a case below differs from what a docstring says, the comment says why.
"""

import pytest

from sd_scratch.prompts import parse_emphasis, prompt_schedule, text_at_step

ROUND = 1.1  # (x)
SQUARE = 1 / 1.1  # [x]: A1111 multiplies by 1/1.1


def assert_pieces(actual, expected):
    """Same texts in the same order, weights equal to within float rounding."""
    assert [text for text, _ in actual] == [text for text, _ in expected]
    assert [weight for _, weight in actual] == pytest.approx([weight for _, weight in expected], rel=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Emphasis: A1111's parse_prompt_attention docstring, exactly
# ---------------------------------------------------------------------------------------------------------------


def test_emphasis_docstring_normal_text():
    assert parse_emphasis("normal text") == [("normal text", 1.0)]


def test_emphasis_docstring_important_word():
    assert parse_emphasis("an (important) word") == [("an ", 1.0), ("important", 1.1), (" word", 1.0)]


def test_emphasis_docstring_unbalanced():
    assert parse_emphasis("(unbalanced") == [("unbalanced", 1.1)]


def test_emphasis_docstring_literal_brackets():
    assert parse_emphasis("\\(literal\\]") == [("(literal]", 1.0)]


def test_emphasis_docstring_unnecessary_parens_merge():
    assert parse_emphasis("(unnecessary)(parens)") == [("unnecessaryparens", 1.1)]


def test_emphasis_docstring_house_on_a_hill_exact_floats():
    assert parse_emphasis("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).") == [
        ("a ", 1.0),
        ("house", 1.5730000000000004),
        (" ", 1.1),
        ("on", 1.0),
        (" a ", 1.1),
        ("hill", 0.55),
        (", sun, ", 1.1),
        ("sky", 1.4641000000000006),
        (".", 1.1),
    ]


# ---------------------------------------------------------------------------------------------------------------
# Emphasis: our cases, answers by hand
# ---------------------------------------------------------------------------------------------------------------

EMPHASIS_CASES = [
    # plain text and the simple brackets
    pytest.param("a cat", [("a cat", 1.0)], id="plain-text-weight-1"),
    pytest.param("(cat)", [("cat", ROUND)], id="round-multiplies-by-1.1"),
    pytest.param("((cat))", [("cat", ROUND * ROUND)], id="nested-round-1.21"),
    pytest.param("(((cat)))", [("cat", ROUND**3)], id="triple-round-1.331"),
    pytest.param("[cat]", [("cat", SQUARE)], id="square-divides-by-1.1"),
    pytest.param("[[cat]]", [("cat", SQUARE * SQUARE)], id="nested-square"),
    pytest.param("a [(cat)] b", [("a cat b", 1.0)], id="round-inside-square-cancels-and-merges"),
    # explicit weights
    pytest.param("(cat:1.5)", [("cat", 1.5)], id="explicit-weight"),
    pytest.param("(cat:0.5)", [("cat", 0.5)], id="weight-below-1"),
    pytest.param("(cat:2.5)", [("cat", 2.5)], id="weight-above-2"),
    pytest.param("(cat:.5)", [("cat", 0.5)], id="weight-without-leading-digit"),
    pytest.param("(cat:+2)", [("cat", 2.0)], id="weight-with-plus-sign"),
    pytest.param("(cat:-1)", [("cat", -1.0)], id="negative-weight"),
    pytest.param("(cat:0)", [("cat", 0.0)], id="zero-weight"),
    pytest.param("(cat: 1.5 )", [("cat", 1.5)], id="spaces-around-weight"),
    pytest.param("((cat:1.5))", [("cat", 1.5 * ROUND)], id="weighted-inside-round"),
    pytest.param("(a (b:2) c)", [("a ", ROUND), ("b", 2 * ROUND), (" c", ROUND)], id="weighted-group-nested-in-round"),
    pytest.param("(a (b:2) c:0.5)", [("a ", 0.5), ("b", 1.0), (" c", 0.5)], id="weighted-group-nested-in-weighted"),
    pytest.param("a (b:1) c", [("a b c", 1.0)], id="weight-1-merges-with-neighbours"),
    # malformed weights: the ":" and what follows are text, the group is a plain (x)
    pytest.param("(word:abc)", [("word:abc", ROUND)], id="weight-not-a-number-is-text"),
    pytest.param("(word:)", [("word:", ROUND)], id="empty-weight-is-text"),
    pytest.param("(word:1e3)", [("word:1e3", ROUND)], id="exponent-weight-is-text"),
    pytest.param("(a:1.5 b)", [("a:1.5 b", ROUND)], id="number-not-followed-by-bracket-is-text"),
    pytest.param("a: b", [("a: b", 1.0)], id="colon-outside-brackets-is-text"),
    # escapes
    pytest.param("\\(a\\)", [("(a)", 1.0)], id="escaped-round-brackets"),
    pytest.param("\\[a\\]", [("[a]", 1.0)], id="escaped-square-brackets"),
    pytest.param("a \\\\ b", [("a \\ b", 1.0)], id="escaped-backslash"),
    pytest.param("(\\(a\\))", [("(a)", ROUND)], id="escaped-brackets-inside-a-group"),
    pytest.param("\\\\(a)", [("\\", 1.0), ("a", ROUND)], id="escaped-backslash-then-group"),
    pytest.param("a\\b", [("ab", 1.0)], id="lone-backslash-is-dropped"),
    pytest.param("a\\", [("a", 1.0)], id="backslash-at-the-end-is-dropped"),
    pytest.param("(a)\\", [("a", ROUND), ("", 1.0)], id="dropped-backslash-leaves-an-empty-piece"),
    # unbalanced brackets
    pytest.param("a (b c", [("a ", 1.0), ("b c", ROUND)], id="unclosed-round-closes-at-the-end"),
    pytest.param("[a", [("a", SQUARE)], id="unclosed-square-closes-at-the-end"),
    pytest.param("((a) b", [("a", ROUND * ROUND), (" b", ROUND)], id="outer-round-left-open"),
    pytest.param("a) b", [("a) b", 1.0)], id="unmatched-round-close-is-text"),
    pytest.param("a] b", [("a] b", 1.0)], id="unmatched-square-close-is-text"),
    pytest.param("(a))", [("a", ROUND), (")", 1.0)], id="extra-round-close-is-text"),
    pytest.param("a:1.5) b", [("a:1.5) b", 1.0)], id="weight-close-without-open-is-text"),
    pytest.param("(a[b)c]", [("a", ROUND), ("b", 1.0), ("c", SQUARE)], id="crossed-brackets-count-apart"),
    pytest.param("([a:1.5)]", [("a", 1.5 * SQUARE)], id="weight-closes-round-across-open-square"),
    # empty things
    pytest.param("", [("", 1.0)], id="empty-prompt"),
    pytest.param("   ", [("   ", 1.0)], id="whitespace-only-prompt"),
    pytest.param("()", [("", 1.0)], id="empty-group-only"),
    pytest.param("a()b", [("ab", 1.0)], id="empty-group-vanishes"),
    # merging
    pytest.param("(a) (b)", [("a", ROUND), (" ", 1.0), ("b", ROUND)], id="groups-apart-stay-apart"),
    pytest.param("(a)[b]", [("a", ROUND), ("b", SQUARE)], id="adjacent-different-weights-stay-apart"),
    pytest.param("(a:1.1)(b)", [("ab", 1.1)], id="adjacent-equal-weights-merge"),
    # BREAK
    pytest.param("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)], id="break-in-the-middle"),
    pytest.param("BREAK a", [("", 1.0), ("BREAK", -1.0), ("a", 1.0)], id="break-at-the-start"),
    pytest.param("a BREAK", [("a", 1.0), ("BREAK", -1.0), ("", 1.0)], id="break-at-the-end"),
    pytest.param("a\nBREAK\nb", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)], id="break-takes-line-breaks-along"),
    pytest.param("a,BREAK,b", [("a,", 1.0), ("BREAK", -1.0), (",b", 1.0)], id="break-between-commas"),
    pytest.param("BREAK BREAK", [("", 1.0), ("BREAK", -1.0), ("", 1.0), ("BREAK", -1.0), ("", 1.0)],
                 id="two-breaks"),
    pytest.param("a break b", [("a break b", 1.0)], id="lower-case-break-is-text"),
    pytest.param("BREAKfast", [("BREAKfast", 1.0)], id="break-inside-a-word-is-text"),
    pytest.param("(a) BREAK (b)", [("a", ROUND), ("", 1.0), ("BREAK", -1.0), ("", 1.0), ("b", ROUND)],
                 id="break-between-groups"),
    # A1111's quirk: a BREAK inside brackets is multiplied with the rest (and the tokenizer then sees text)
    pytest.param("(a BREAK b)", [("a", ROUND), ("BREAK", -ROUND), ("b", ROUND)],
                 id="break-inside-a-group-is-multiplied"),
]


@pytest.mark.parametrize("prompt, expected", EMPHASIS_CASES)
def test_emphasis(prompt, expected):
    assert_pieces(parse_emphasis(prompt), expected)


def test_emphasis_merging_needs_exactly_equal_floats():
    # 1.1 * 1.1 is 1.2100000000000002, not 1.21: the two pieces keep their own weights
    assert parse_emphasis("(a:1.21)((b))") == [("a", 1.21), ("b", 1.2100000000000002)]


def test_emphasis_break_piece_is_exactly_the_tokenizer_marker():
    assert parse_emphasis("a BREAK b")[1] == ("BREAK", -1.0)


@pytest.mark.parametrize("prompt", ["(word:1.2.3)", "(word:.)"])
def test_emphasis_weight_matching_the_pattern_but_not_a_number_raises_as_in_a1111(prompt):
    with pytest.raises(ValueError, match="not a number"):
        parse_emphasis(prompt)


# ---------------------------------------------------------------------------------------------------------------
# Prompt editing: A1111's get_learned_conditioning_prompt_schedules doctests (10 steps)
# ---------------------------------------------------------------------------------------------------------------

ALTERNATING_A_AND_B11 = [(step, "a" if step % 2 else "(b:1.1)") for step in range(1, 11)]

A1111_SCHEDULE_DOCTESTS = [
    pytest.param("test", [(10, "test")], id="test"),
    pytest.param("a [b:3]", [(3, "a "), (10, "a b")], id="a [b:3]"),
    pytest.param("a [b: 3]", [(3, "a "), (10, "a b")], id="a [b: 3]"),
    pytest.param("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")], id="a [[[b]]:2]"),
    pytest.param("[(a:2):3]", [(3, ""), (10, "(a:2)")], id="[(a:2):3]"),
    pytest.param("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")], id="a [b : c : 1] d"),
    pytest.param("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")], id="a[b:[c:d:2]:1]e"),
    pytest.param("a [unbalanced", [(10, "a [unbalanced")], id="a [unbalanced"),
    pytest.param("a [b:.5] c", [(5, "a  c"), (10, "a b c")], id="a [b:.5] c"),
    pytest.param("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")], id="((a][:b:c [d:3]"),
    pytest.param("[a|(b:1.1)]", ALTERNATING_A_AND_B11, id="[a|(b:1.1)]"),
    pytest.param("[fe|]male", [(1, "female"), (2, "male"), (3, "female"), (4, "male"), (5, "female"), (6, "male"),
                               (7, "female"), (8, "male"), (9, "female"), (10, "male")], id="[fe|]male"),
    pytest.param("[fe|||]male", [(1, "female"), (2, "male"), (3, "male"), (4, "male"), (5, "female"), (6, "male"),
                                 (7, "male"), (8, "male"), (9, "female"), (10, "male")], id="[fe|||]male"),
]


@pytest.mark.parametrize("prompt, expected", A1111_SCHEDULE_DOCTESTS)
def test_schedule_a1111_doctest(prompt, expected):
    assert prompt_schedule(prompt, 10) == expected


def test_schedule_a1111_doctest_not_handled_right_now_is_unparseable():
    # The docstring says [[5, 'a  c'], [10, 'a {b|d{ c']], marked "not handling this right now". That answer dates
    # from before [a|b]: since "|" became alternation, "{b|d{:.5" fits no rule and A1111's own code returns the
    # prompt unchanged (checked with lark 1.1.2). We follow the code.
    assert prompt_schedule("a [{b|d{:.5] c", 10) == [(10, "a [{b|d{:.5] c")]


@pytest.mark.parametrize("prompt, expected", [
    # The doctests' hires-pass cases (10 base steps, 10 hires steps) use A1111's new rule; with the old rule and no
    # hires pass, .5 is half the steps and 1.5 is step 1.
    pytest.param("a [b:.5] c", [(5, "a  c"), (10, "a b c")], id="a [b:.5] c"),
    pytest.param("a [b:1.5] c", [(1, "a  c"), (10, "a b c")], id="a [b:1.5] c"),
])
def test_schedule_a1111_hires_doctests_under_the_old_rule(prompt, expected):
    assert prompt_schedule(prompt, 10) == expected


def test_schedule_a1111_fantasy_landscape_comment_example():
    prompt = ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6]"
              "[ in background:0.25] [shoddy:masterful:0.5]")
    assert prompt_schedule(prompt, 100) == [
        (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
        (75, "fantasy landscape with a lake and an oak in background masterful"),
        (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
    ]


def test_schedule_a1111_jeweled_crown_example():
    # get_learned_conditioning's docstring: 'a [blue:green:5] jeweled crown' at 20 steps ends stretches at 5 and 20
    assert prompt_schedule("a [blue:green:5] jeweled crown", 20) == [(5, "a blue jeweled crown"),
                                                                      (20, "a green jeweled crown")]


# ---------------------------------------------------------------------------------------------------------------
# Prompt editing: our cases, answers by hand
# ---------------------------------------------------------------------------------------------------------------

SCHEDULE_CASES = [
    # when: below 1 a fraction of the steps, else a step number, capped at the steps; only steps >= 1 switch
    pytest.param("a [red:blue:0.5] ball", 20, [(10, "a red ball"), (20, "a blue ball")], id="half-of-the-steps"),
    pytest.param("[a:b:0.25]", 20, [(5, "a"), (20, "b")], id="quarter-of-the-steps"),
    pytest.param("[a:b:0.29]", 100, [(28, "a"), (100, "b")], id="fraction-truncated-as-a1111-computes-0.29x100"),
    pytest.param("[a:b:7]", 20, [(7, "a"), (20, "b")], id="step-number"),
    pytest.param("[a:b:2.7]", 20, [(2, "a"), (20, "b")], id="decimal-step-number-truncated"),
    pytest.param("[a:b:1]", 20, [(1, "a"), (20, "b")], id="step-1"),
    pytest.param("[a:b:1.0]", 20, [(1, "a"), (20, "b")], id="1.0-is-step-1-under-the-old-rule"),
    pytest.param("[a:b:1e1]", 20, [(10, "a"), (20, "b")], id="exponent-number"),
    pytest.param("[a:b: 5 ]", 20, [(5, "a"), (20, "b")], id="spaces-around-the-number"),
    pytest.param("[a:b:20]", 20, [(20, "a")], id="when-equals-steps-never-switches"),
    pytest.param("[a:b:25]", 20, [(20, "a")], id="when-past-the-steps-is-capped"),
    pytest.param("[a:b:0]", 20, [(20, "b")], id="when-0-is-to-from-the-start"),
    pytest.param("[a:b:0.01]", 20, [(20, "b")], id="fraction-below-one-step-is-to-from-the-start"),
    pytest.param("[a:b:-3]", 20, [(20, "b")], id="negative-when-is-to-from-the-start"),
    pytest.param("[a:b:0.5]", 1, [(1, "b")], id="one-step"),
    # the three forms
    pytest.param("a [dog:5]", 20, [(5, "a "), (20, "a dog")], id="to-when-adds-text"),
    pytest.param("a [dog::5]", 20, [(5, "a dog"), (20, "a ")], id="from-empty-when-removes-text"),
    pytest.param("[a:b:5] [c:d:10]", 20, [(5, "a c"), (10, "b c"), (20, "b d")], id="two-edits"),
    pytest.param("[a:b:5] [c:d:5]", 20, [(5, "a c"), (20, "b d")], id="two-edits-same-step"),
    # nesting
    pytest.param("[[a:b:5]:c:10]", 20, [(5, "a"), (10, "b"), (20, "c")], id="edit-inside-from"),
    pytest.param("[[a:b:15]:c:10]", 20, [(10, "a"), (15, "c"), (20, "c")], id="hidden-inner-edit-still-a-step"),
    pytest.param("[a:[b:c:15]:10]", 20, [(10, "a"), (15, "b"), (20, "c")], id="edit-inside-to"),
    # alternation
    pytest.param("[cat|dog]", 4, [(1, "cat"), (2, "dog"), (3, "cat"), (4, "dog")], id="alternation-two-options"),
    pytest.param("a [x|y|z]", 5, [(1, "a x"), (2, "a y"), (3, "a z"), (4, "a x"), (5, "a y")],
                 id="alternation-three-options"),
    pytest.param("[cat]", 4, [(4, "[cat]")], id="one-option-is-emphasis-not-alternation"),
    pytest.param("[a|]b", 3, [(1, "ab"), (2, "b"), (3, "ab")], id="empty-last-option"),
    pytest.param("[|a]", 3, [(1, ""), (2, "a"), (3, "")], id="empty-first-option"),
    pytest.param("[a|[b:c:3]]", 4, [(1, "a"), (2, "b"), (3, "a"), (4, "c")], id="edit-inside-alternation"),
    pytest.param("[[a|b]:c:2]", 4, [(1, "a"), (2, "b"), (3, "c"), (4, "c")], id="alternation-inside-edit"),
    pytest.param("[a|[b|c]]", 4, [(1, "a"), (2, "c"), (3, "a"), (4, "c")], id="nested-alternation-shares-the-step"),
    # emphasis passes through untouched
    pytest.param("[(red:1.2):blue:5] ball", 10, [(5, "(red:1.2) ball"), (10, "blue ball")], id="emphasis-inside-edit"),
    pytest.param("((a [b:c:2]))", 4, [(2, "((a b))"), (4, "((a c))")], id="edit-inside-emphasis"),
    pytest.param("[a|(b:1.2)|[c]]", 3, [(1, "a"), (2, "(b:1.2)"), (3, "[c]")], id="emphasis-inside-options"),
    pytest.param("\\[a:b:2\\]", 4, [(4, "\\[a:b:2\\]")], id="escaped-brackets-are-text-backslashes-kept"),
    # what fits no rule: stray brackets are text; a "|" outside [a|b] makes the whole prompt unparseable
    pytest.param("a [b:c:2", 10, [(10, "a [b:c:2")], id="unclosed-edit-is-text"),
    pytest.param("[a:b:c]", 10, [(10, "[a:b:c]")], id="when-not-a-number-is-text"),
    pytest.param("[a:b:c:5]", 10, [(10, "[a:b:c:5]")], id="three-colons-is-text"),
    pytest.param("a | [b:c:2]", 10, [(10, "a | [b:c:2]")], id="bar-outside-alternation-unparseable"),
    pytest.param("[a:b|c]", 10, [(10, "[a:b|c]")], id="colon-inside-alternation-unparseable"),
    pytest.param("[a:b:2] \\", 10, [(10, "[a:b:2] \\")], id="backslash-at-the-end-unparseable"),
]


@pytest.mark.parametrize("prompt, steps, expected", SCHEDULE_CASES)
def test_schedule(prompt, steps, expected):
    assert prompt_schedule(prompt, steps) == expected


def test_schedule_well_formed_group_beside_stray_brackets_is_read_as_the_group():
    # A1111's lark parser reads this either way depending on Python's hash seed; we always take the edit.
    assert prompt_schedule("[b:1]]]", 3) == [(1, "]]"), (3, "b]]")]


def test_schedule_last_end_step_is_always_steps():
    for prompt in ["a", "[a:b:3]", "[a|b]", "[a:b:99]", "a | b"]:
        assert prompt_schedule(prompt, 7)[-1][0] == 7


def test_schedule_needs_at_least_one_step():
    with pytest.raises(ValueError, match="at least 1"):
        prompt_schedule("a", 0)


def test_schedule_then_emphasis_reads_each_text():
    schedule = prompt_schedule("a [(red:1.5):blue:2] ball", 4)
    assert [parse_emphasis(text) for _, text in schedule] == [
        [("a ", 1.0), ("red", 1.5), (" ball", 1.0)],
        [("a blue ball", 1.0)],
    ]


# ---------------------------------------------------------------------------------------------------------------
# text_at_step: the loop counts its steps from 0, the schedule's end steps count from 1
# ---------------------------------------------------------------------------------------------------------------


def test_text_at_step_boundaries_of_an_edit():
    schedule = prompt_schedule("[a:b:10]", 20)
    assert [text_at_step(schedule, i) for i in range(0, 11)] == ["a"] * 11  # 0..10: eleven steps of `a`
    assert [text_at_step(schedule, i) for i in range(11, 20)] == ["b"] * 9


def test_text_at_step_alternation_uses_the_first_option_twice():
    # loop steps 0 and 1 both pick the entry ending at step 1, as A1111's reconstruct_cond_batch does
    schedule = prompt_schedule("[x|y]", 4)
    assert [text_at_step(schedule, i) for i in range(4)] == ["x", "x", "y", "x"]


def test_text_at_step_single_text_for_every_step():
    schedule = prompt_schedule("a photo", 5)
    assert {text_at_step(schedule, i) for i in range(5)} == {"a photo"}


def test_text_at_step_past_the_end_falls_back_to_the_first_entry_as_a1111():
    schedule = prompt_schedule("[a:b:10]", 20)
    assert text_at_step(schedule, 20) == "b"
    assert text_at_step(schedule, 21) == "a"
