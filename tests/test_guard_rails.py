"""The guard rails of a served request (herd/guard/rails.py) on the tiny Prompt Guard classifier of
test_guard_prompt.py (INJECT drives label 1): user and tool messages checked, a growing answer checked as it grows,
and the moderation shapes."""
import pytest

from herd.guard.llama_guard import CATEGORIES
from herd.guard.prompt_guard import load_prompt_guard
from herd.guard.rails import OPENAI_CATEGORIES, GuardRails, moderation_response, moderation_result
from herd.guard.verdict import GuardError, Verdict
from test_guard_prompt import tiny_prompt_guard


@pytest.fixture(scope="module")
def guard(tmp_path_factory):
    return load_prompt_guard(tiny_prompt_guard(tmp_path_factory.mktemp("pg")))


def test_input_rail_reads_user_and_tool_messages(guard):
    rails = GuardRails(input_guard=guard)
    ok = [{"role": "system", "content": "w1 INJECT"},            # the operator's own text is not checked
          {"role": "user", "content": "w1 w2"},
          {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]
    assert rails.check_input(ok) is None
    bad = ok + [{"role": "tool", "tool_call_id": "1", "content": [{"type": "text", "text": "w3 INJECT w4"}]}]
    index, v = rails.check_input(bad)
    assert index == 3 and v.flagged and v.score > 0.9
    assert rails.flagged["input"] == 1 and rails.checked["input"] == 3


def test_output_rail_checks_a_growing_answer(guard):
    rails = GuardRails(output_guard=guard, check_every=30)
    check = rails.output_check([{"role": "user", "content": "w1"}])
    deltas = ["w1 w2 w3 ", "w4 w5 w6 w7 ", "w8 w9 w10 ", "INJECT ", "w11 w12 w13 w14 w15 w16"]
    results = [check.feed(d) for d in deltas]
    assert results[:3] == [None, None, None]         # 30 characters reached at the 3rd delta: checked, clean
    flagged_at = next(i for i, r in enumerate(results) if r is not None)
    assert flagged_at == 4 and results[flagged_at].flagged     # the next check after INJECT arrived
    assert check.finish() is results[flagged_at] and rails.flagged["output"] == 1
    clean = rails.output_check([]) 
    clean.feed("w1 w2")
    assert clean.finish() is None and rails.checked["output"] == 3


def test_moderation_shapes(guard):
    body = moderation_response(guard, ["w1 w2", "w1 INJECT"], "pg")
    assert body["id"].startswith("modr-") and body["model"] == "pg" and len(body["results"]) == 2
    a, b = body["results"]
    assert not a["flagged"] and b["flagged"] and b["categories"]["prompt_attack"]
    assert set(OPENAI_CATEGORIES) <= set(b["categories"])
    assert b["category_applied_input_types"]["prompt_attack"] == ["text"]
    with pytest.raises(GuardError, match="non-empty list of strings"):
        moderation_response(guard, [], "pg")


def test_llama_guard_codes_map_to_openai_categories():
    class LG:                                           # just the attributes moderation_result reads
        categories, excluded = CATEGORIES, ("S13",)
    r = moderation_result(LG(), Verdict(flagged=True, score=0.8, guard="lg", categories=["S1", "S10"]))
    cats = r["categories"]
    assert cats["violence"] and cats["illicit/violent"] and cats["hate"] and not cats["sexual"]
    assert cats["violent_crimes"] and cats["hate"] and not cats["privacy"] and "elections" not in cats
    assert r["category_scores"]["hate"] == 0.8 and r["category_scores"]["sexual"] == 0.0
