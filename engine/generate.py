"""generate_text, stream_text, generate_batch: the Python API on top of one Engine.

Everything is checked before work starts (ParamError, a ValueError naming the field); then the engine
is stepped until the requests are done.
"""

from engine.detokenizer import encode_prompt
from engine.llm_engine import Engine
from engine.sampling_params import SamplingParams, check_request


def requests(engine, prompts, params):
    """Validate everything up front (any bad value raises before work starts), then add."""
    p = SamplingParams.make(params)
    ids = [check_request(encode_prompt(prompt, p.raw), p, context=engine.config.block_size) for prompt in prompts]
    return [engine.add(x, p) for x in ids]


def outputs(engine, requests):
    """Step the engine until the requests are done; yields their Outputs."""
    mine = {r.id for r in requests}
    while not all(r.done for r in requests):
        yield from (o for o in engine.step() if o.request_id in mine)


def own_engine(model, rows):
    """model itself if it is an Engine nobody else steps; else a fresh Engine with `rows` slots."""
    return model if isinstance(model, Engine) else Engine(model, max_batch=max(1, rows))


def generate_batch(model, prompts, **params):
    """Generate for a list of prompts together (an Engine or a model) -> one result dict per prompt.

    result: {"text", "finish_reason": "eos"|"stop"|"length"|"cancelled", "prompt_tokens",
    "completion_tokens", "token_ids"}. completion_tokens counts every generated token, including a
    final <|endoftext|> and the token that completed a stop string; text excludes both.
    """
    engine = own_engine(model, len(prompts))
    reqs = requests(engine, prompts, params)
    results = {r.id: {"text": "", "token_ids": []} for r in reqs}
    for o in outputs(engine, reqs):
        res = results[o.request_id]
        res["text"] += o.text
        res["token_ids"] += o.token_ids
        if o.finish_reason is not None:
            res.update(finish_reason=o.finish_reason, **o.usage)
    return list(results.values())


def generate_text(model, prompt, **params):
    """Generate a completion for one prompt; parameters as validate_params. See generate_batch."""
    return generate_batch(model, [prompt], **params)[0]


def stream_text(model, prompt, **params):
    """An iterator of the generated text in pieces: never a broken UTF-8 character, never any part
    of a stop string. Parameters as generate_text; they are checked at the call (ParamError)."""
    engine = own_engine(model, 1)
    reqs = requests(engine, [prompt], params)
    return (o.text for o in outputs(engine, reqs) if o.text)
