"""Acceptance for the sampling options (issue: every sampling option of seed 002), on SmolLM2's real logits.

Each option is shown to act on real logits, and to compose with other options in one batch.
"""
import json
import random

import pytest
import torch

from ember.engine.request import Req
from ember.engine.sampler import Sampler
from ember.engine.sampling_params import SamplingParams

PROMPT = "Write a short poem about the sea."
REPEAT = "Hello Hello Hello Hello Hello"
BASE = {"max_new_tokens": 16, "ignore_eos": True}


@pytest.fixture(scope="module")
def smol(engine_for):
    return engine_for("smollm2")


def greedy(smol, prompt, **kw):
    return smol.generate(prompt, {**BASE, "temperature": 0, **kw})["output_ids"]


def test_temperature_zero_and_top_k_one_are_greedy(smol):
    g = greedy(smol, PROMPT)
    assert smol.generate(PROMPT, {**BASE, "temperature": 1.0, "top_k": 1, "seed": 7})["output_ids"] == g
    assert smol.generate(PROMPT, {**BASE, "temperature": 1.0, "min_p": 1.0, "seed": 7})["output_ids"] == g
    # plain temperature 1 sampling does wander off the greedy path
    samples = [smol.generate(PROMPT, {**BASE, "temperature": 1.0, "seed": s})["output_ids"] for s in range(3)]
    assert any(s != g for s in samples)


def test_logit_bias_bans_and_forces(smol):
    g = greedy(smol, PROMPT)
    banned = greedy(smol, PROMPT, logit_bias={g[0]: -100})
    assert banned[0] != g[0]
    forced_tok = smol.tokenizer.encode(" Banana")[0]
    assert greedy(smol, PROMPT, logit_bias={forced_tok: 100})[0] == forced_tok


def reference_penalized(logits: torch.Tensor, prompt: list[int], output: list[int], presence=0.0, frequency=0.0,
                        repetition=1.0) -> torch.Tensor:
    """The definitions: OpenAI's presence/frequency penalties over the output tokens (minus presence once per seen
    token, minus frequency per occurrence), then CTRL's repetition penalty over prompt + output (positive logits
    divided, negative multiplied)."""
    out = logits.clone()
    for tok in set(output):
        out[tok] -= frequency * output.count(tok) + presence
    for tok in set(prompt + output):
        out[tok] = out[tok] / repetition if out[tok] > 0 else out[tok] * repetition
    return out


PENALTIES = [{"presence_penalty": 1.5}, {"frequency_penalty": 0.7}, {"repetition_penalty": 1.8},
             {"presence_penalty": 0.5, "frequency_penalty": 0.3, "repetition_penalty": 1.3}]
KEYS = {"presence_penalty": "presence", "frequency_penalty": "frequency", "repetition_penalty": "repetition"}


@pytest.mark.parametrize("device_penalties", [False, True], ids=["host", "device"])
def test_penalties_follow_their_definitions_in_one_batch(smol, device_penalties):
    """Real logits, a history with repeated tokens; four requests with different penalties in one batch: each row
    equals its definition, and tokens never seen keep their logit. Both forms (ember/engine/penalties.py): at the
    seen tokens' indices (CPU's default) and from counts kept on the device (CUDA's)."""
    prompt = smol.tokenizer.encode(REPEAT)
    output = [prompt[1], prompt[1], prompt[2], 42, 42, 42]
    logits = smol.core.prompt_logits(prompt + output)[-1].float()
    reqs = []
    for i, pen in enumerate(PENALTIES):
        r = Req(f"r{i}", list(prompt), SamplingParams(max_new_tokens=8, **pen))
        r.token_ids = list(prompt) + list(output)
        reqs.append(r)
    sampler = Sampler(logits.shape[-1], [], "cpu", device_penalties=device_penalties)
    got = sampler.apply_penalties_and_bias(logits.repeat(len(reqs), 1), reqs)
    for row, pen in zip(got, PENALTIES):
        want = reference_penalized(logits, prompt, output, **{KEYS[k]: v for k, v in pen.items()})
        torch.testing.assert_close(row, want, rtol=0, atol=1e-5)
        assert not torch.equal(row, logits)
        unseen = torch.ones_like(logits, dtype=torch.bool)
        unseen[prompt + output] = False
        assert torch.equal(row[unseen], logits[unseen])


@pytest.mark.parametrize("penalty", PENALTIES[:3])
def test_greedy_decoding_applies_the_penalty_every_step(smol, penalty):
    """The engine's greedy tokens are, at every step, the argmax of the penalised real logits given the tokens so
    far (the penalty sees the right prompt and output tokens as decoding goes on)."""
    prompt = smol.tokenizer.encode(REPEAT)
    out = greedy(smol, REPEAT, **penalty)
    assert out != greedy(smol, REPEAT)
    rows = smol.core.prompt_logits(prompt + out[:-1])[len(prompt) - 1:].float()
    for t, tok in enumerate(out):
        want = reference_penalized(rows[t], prompt, out[:t], **{KEYS[k]: v for k, v in penalty.items()})
        top2 = want.topk(2)
        assert tok == int(top2.indices[0]) or float(top2.values[0] - want[tok]) < 1e-4, f"step {t}"


def test_min_tokens_bans_eos_until_reached(smol):
    prompt = [{"role": "user", "content": "Say just: yes"}]
    ids = smol.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
    short = smol.generate(input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": 40})
    assert short["meta_info"]["finish_reason"]["type"] == "stop" and len(short["output_ids"]) < 12
    longer = smol.generate(input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": 40,
                                                           "min_new_tokens": 12})
    assert len(longer["output_ids"]) >= 12


def _probs_after_truncation(smol, **kw):
    """Real next-token probabilities for PROMPT, truncated by the sampler with the given options."""
    ids = smol.tokenizer.encode(PROMPT)
    logits = smol.core.prompt_logits(ids)[-1:].float()
    probs = torch.softmax(logits, -1)
    sp = SamplingParams(**kw)
    sampler = Sampler(logits.shape[-1], [], "cpu")
    kept, token_ids = sampler.candidates(probs.clone(), [sp])
    return probs[0], torch.zeros_like(probs).scatter_(1, token_ids, kept)[0]  # back to vocabulary order


def test_min_p_top_a_top_p_filter_as_defined(smol):
    p, kept = _probs_after_truncation(smol, min_p=0.1)
    assert torch.equal(kept > 0, p >= 0.1 * p.max())
    p, kept = _probs_after_truncation(smol, top_a=0.5)
    assert torch.equal(kept > 0, p >= 0.5 * p.max() ** 2)
    p, kept = _probs_after_truncation(smol, top_p=0.5)
    sorted_p = p.sort(descending=True).values
    n_keep = int((kept > 0).sum())
    assert sorted_p[:n_keep].sum() >= 0.5 > sorted_p[:n_keep - 1].sum()
    p, kept = _probs_after_truncation(smol, top_k=5)
    assert int((kept > 0).sum()) == 5


def test_options_compose_in_one_batch(smol):
    """Requests with different options in one batch each get exactly what they get alone."""
    g = greedy(smol, PROMPT)
    params = [
        {**BASE, "temperature": 0},
        {**BASE, "temperature": 0, "logit_bias": {g[0]: -100}},
        {**BASE, "temperature": 0, "presence_penalty": 1.5},
        {**BASE, "temperature": 0, "repetition_penalty": 1.5},
        {**BASE, "temperature": 0.9, "top_k": 20, "top_p": 0.9, "seed": 11},
        {**BASE, "temperature": 1.2, "min_p": 0.05, "seed": 12},
        {**BASE, "temperature": 1.0, "top_a": 0.3, "frequency_penalty": 0.5, "seed": 13},
        {**BASE, "temperature": 0.7, "seed": 14, "min_new_tokens": 16},
    ]
    prompts = [PROMPT, PROMPT, REPEAT, REPEAT, PROMPT, PROMPT, REPEAT, PROMPT]
    alone = [smol.generate(p, sp)["output_ids"] for p, sp in zip(prompts, params)]
    together = smol.generate(prompts, params)
    for i, (a, t) in enumerate(zip(alone, together)):
        assert t["output_ids"] == a, f"request {i} ({params[i]}) changed inside the batch"


def test_seeded_request_is_reproducible_among_random_requests(smol):
    seeded = {"temperature": 1.0, "top_p": 0.95, "max_new_tokens": 24, "seed": 2024, "ignore_eos": True}
    alone = smol.generate(PROMPT, seeded)["output_ids"]
    rng = random.Random(5)
    others = [{"temperature": rng.uniform(0.5, 1.5), "top_k": rng.choice([-1, 10, 50]),
               "max_new_tokens": rng.randint(4, 30)} for _ in range(8)]
    prompts = [f"Random prompt number {i}: tell me about {w}" for i, w in
               enumerate(["cats", "rockets", "bread", "rivers", "music", "stars", "trees", "glass"])]
    outs = smol.generate(prompts[:4] + [PROMPT] + prompts[4:], others[:4] + [seeded] + others[4:])
    assert outs[4]["output_ids"] == alone


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    kinds = ["integer", "number", "enum", "boolean", "string", "array"] + (["object"] if depth < 2 else [])
    props, required = {}, []
    for i in range(rng.randint(1, 3)):
        kind = rng.choice(kinds)
        name = f"{rng.choice(['id', 'name', 'size', 'color', 'items', 'meta', 'score'])}_{i}"
        if kind == "integer":
            props[name] = {"type": "integer", "minimum": 0, "maximum": 1000}
        elif kind == "number":
            props[name] = {"type": "number"}
        elif kind == "enum":
            props[name] = {"type": "string", "enum": rng.sample(["red", "green", "blue", "small", "large"], 3)}
        elif kind == "boolean":
            props[name] = {"type": "boolean"}
        elif kind == "string":
            props[name] = {"type": "string", "maxLength": 12}
        elif kind == "array":
            props[name] = {"type": "array", "items": {"type": "integer"}, "maxItems": 3}
        else:
            props[name] = random_schema(rng, depth + 1)
        required.append(name)
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def test_json_schema_outputs_validate_and_json_object_parses(smol):
    """20 random schemas at temperature 1.0, run as one batch with free requests beside them."""
    import jsonschema  # in the test extra: a missing package fails the test instead of skipping it
    rng = random.Random(0)
    schemas = [random_schema(rng) for _ in range(20)]
    prompt = "Produce a JSON object:"
    params = [{"temperature": 1.0, "max_new_tokens": 256, "seed": i, "json_schema": json.dumps(s)}
              for i, s in enumerate(schemas)]
    # json_object: any JSON object; asked (in chat form) for a small one so it ends before max_new_tokens
    params += [{"temperature": 0.7, "max_new_tokens": 384, "seed": 100 + i, "json_schema": "{}"} for i in range(3)]
    chat = smol.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Reply with a JSON object giving a person's name and age."}],
        add_generation_prompt=True, tokenize=False)
    free = {**BASE, "temperature": 0}
    free_alone = smol.generate(PROMPT, free)["output_ids"]
    outs = smol.generate([prompt] * 20 + [chat] * 3 + [PROMPT], params + [free])
    for schema, out in zip(schemas, outs[:20]):
        assert out["meta_info"]["finish_reason"]["type"] == "stop", out
        jsonschema.validate(json.loads(out["text"]), schema)
    for out in outs[20:23]:
        assert out["meta_info"]["finish_reason"]["type"] == "stop", out
        json.loads(out["text"])
    # the free request is unchanged by the grammar requests beside it
    assert outs[-1]["output_ids"] == free_alone


def test_regex_and_ebnf_constraints(smol):
    out = smol.generate("My phone number is", {"temperature": 1.0, "seed": 3, "max_new_tokens": 30,
                                                "regex": r"\d{3}-\d{4}"})
    import re
    assert re.fullmatch(r"\d{3}-\d{4}", out["text"])
    ebnf = 'root ::= "yes" | "no"'
    out = smol.generate("Is the sky blue? Answer:", {"temperature": 1.0, "seed": 4, "max_new_tokens": 10,
                                                      "ebnf": ebnf})
    assert out["text"] in ("yes", "no")


def test_a_grammar_that_has_ended_finishes_the_request_even_with_ignore_eos(smol):
    # regex "" admits only the stop token; with ignore_eos the request must still end there (the grammar
    # cannot give a next-token mask after its end), not fail the step (schemathesis found this as a 500)
    out = smol.generate("x", {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True, "regex": ""})
    assert out["meta_info"]["finish_reason"]["type"] == "stop", out
    assert out["text"] == "" and out["meta_info"]["completion_tokens"] == 1, out
    out = smol.generate("Is the sky blue? Answer:", {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True,
                                                      "ebnf": 'root ::= "yes" | "no"'})
    assert out["text"] in ("yes", "no") and out["meta_info"]["finish_reason"]["type"] == "stop", out


def test_a_top_k_beyond_the_vocabulary_and_a_huge_seed_are_taken(smol):
    # any integer passes the API's checks (top_k >= 0): beyond the vocabulary top_k keeps every token, and a seed
    # beyond 64 bits is reduced (both once overflowed a tensor: a 500 found by schemathesis)
    huge = 714187959686457327616
    out = smol.generate(PROMPT, {**BASE, "temperature": 1.0, "top_k": huge, "seed": huge})
    assert len(out["output_ids"]) == 16, out
    assert out["output_ids"] == smol.generate(PROMPT, {**BASE, "temperature": 1.0, "seed": huge})["output_ids"]


def test_invalid_grammar_fails_the_request_cleanly(smol):
    out = smol.generate(PROMPT, {"max_new_tokens": 4, "json_schema": "{not json"})
    assert out["meta_info"]["finish_reason"]["type"] == "abort"
    assert smol.generate(PROMPT, {**BASE, "temperature": 0})["output_ids"]  # the engine still serves
