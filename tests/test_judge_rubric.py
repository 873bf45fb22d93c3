"""What the judge is asked and how its answers are read: the rubric template (columns, a
missing field, no lookups, files), conversation prompts, pointwise scores and reasons, and the
group answer's one score per response."""

import pytest

from grpo_mlx import judge_rubric as R

SCALE = (0.0, 10.0)


def settings(**kw):
    base = dict(model="base", rubric="Rate it.", rubric_source="test rubric", scale=SCALE, max_tokens=8)
    return R.JudgeSettings(**{**base, **kw})


def test_rubric_is_filled_with_prompt_completion_and_columns():
    s = settings(rubric="Q: {prompt}\nA: {completion}\nKey: {answer} ({source})\nScale {scale}. {{literal}}")
    [message] = R.pointwise_messages(s, {"prompt": "2+2", "completion": "4", "answer": "4", "source": "book"})
    assert message["content"] == "Q: 2+2\nA: 4\nKey: 4 (book)\nScale 0-10. {literal}"
    # without {completion} in the rubric, the prompt and response are appended with the answer format
    [message] = R.pointwise_messages(settings(rubric="Be fair."), {"prompt": "2+2", "completion": "5"})
    assert message["content"].startswith("Be fair.") and "## Response\n5" in message["content"]
    assert "Score: N" in message["content"]


def test_a_missing_field_is_one_sentence_naming_it_and_the_rubric():
    with pytest.raises(R.JudgeError, match=r"rubric test rubric: no field \{reference\}"):
        R.render("{reference}", {"prompt": "p"}, "test rubric")
    for template in ("{prompt.__class__}", "{prompt[0]}", "{prompt!r}", "{prompt:>99999}"):
        with pytest.raises(R.JudgeError, match="not a plain field name"):
            R.render(template, {"prompt": "p"}, "test rubric")


def test_a_conversation_prompt_is_shown_as_its_messages():
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    reply = [{"role": "assistant", "content": "4"}]
    [message] = R.pointwise_messages(settings(rubric="{prompt} -> {completion}"), {"prompt": chat, "completion": reply})
    assert message["content"] == "system: Be brief.\n\nuser: 2+2? -> 4"


def test_rubric_file_is_read_and_a_missing_one_refused(tmp_path):
    path = tmp_path / "rubric.md"
    path.write_text("Rate {completion}")
    assert R.load_rubric(str(path)) == ("Rate {completion}", str(path))
    assert R.load_rubric("Rate the tone.")[1] == "judge_rubric"
    with pytest.raises(R.JudgeError, match="rubric file not found"):
        R.load_rubric(str(tmp_path / "missing.md"))


@pytest.mark.parametrize(
    "answer, score",
    [
        ("Clear and right.\nScore: 8", 8.0),
        ("I give it 7/10.", 7.0),
        ("3 out of 10", 3.0),
        ("Score: 12\nScore: 4", 4.0),  # the last in range
        ("Between 2 and 9, say 6", 6.0),
        ("Score: 11", None),  # outside the scale
        ("no number here", None),
    ],
)
def test_pointwise_score_is_the_last_number_on_the_scale(answer, score):
    assert R.parse_score(answer, SCALE)[0] == score


def test_reason_is_the_answer_without_its_score():
    assert R.parse_score("Concise and polite. Score: 9/10", SCALE) == (9.0, "Concise and polite.")


def test_group_answer_needs_exactly_one_score_per_response():
    good = "1: 7 - on topic\nResponse 2: 3 - rambles\n#3 = 10"
    assert R.parse_group(good, SCALE, 3) == ([7.0, 3.0, 10.0], ["on topic", "rambles", ""], "")
    assert R.parse_group("1: 7\n2: 3", SCALE, 3)[2] == "no score for response 3"
    assert R.parse_group("1: 7\n2: 3\n3: 1\n4: 2", SCALE, 3)[2] == "a score for response 4 of 3"
    assert R.parse_group("1: 7\n1: 8\n2: 3", SCALE, 2)[2] == "response 1 was scored twice"
    assert "outside" in R.parse_group("1: 7\n2: 30", SCALE, 2)[2]
