"""The one-token decode step as a CUDA graph: what `generate()` runs on its decode steps when asked for a static
cache, the transformers way:

    model.generate(**inputs, cache_implementation="static", max_new_tokens=...)

transformers builds a `StaticCache` (for our blocks: one `LinearAttentionLayer` each, whose states keep one address
and are updated in place), and on CUDA asks the model for `get_compiled_call(compile_config)` to run every decode
step. Our models answer with `DecodeGraph`: instead of `torch.compile` (which cannot trace the compiled WKV ops and
would recompile per shape) it captures the model's own one-token step in a CUDA graph on first use and replays it:
one launch for the whole step instead of ~20 kernel launches and their Python per layer. The graph reads and writes
the cache's state tensors where they live, so the cache stays the ordinary transformers object.

Anything that is not a plain one-token step with a filled cache on a CUDA device (the CPU, the prefill, a mask,
hidden states, training) runs the eager model unchanged: on the CPU `generate(cache_implementation="static")` is the
eager path with a static cache.
"""

from __future__ import annotations

import weakref

import torch

# keyword arguments a decode step may carry that the graph takes as fixed (part of its key)
_FIXED_ARGUMENTS = ("use_cache", "return_dict", "logits_to_keep")


def _cache_tensors(cache) -> list[torch.Tensor] | None:
    """Every state tensor the step reads and writes (conv and recurrent states, the position counters), or None if
    the cache is not a filled recurrent cache with one address per state."""
    tensors = []
    for layer in getattr(cache, "layers", None) or [None]:
        if layer is None or getattr(layer, "record_past", True) or not all(layer.has_previous_state.values()):
            return None
        for states in (layer.conv_states, layer.recurrent_states):
            tensors += [state for state in states.values() if state is not None]
        tensors.append(layer.cumulative_length_linear)
    return tensors


class _CapturedStep:
    """One captured step: its input buffer, the graph and the logits it leaves behind."""

    def __init__(self, model, cache, input_ids: torch.Tensor, fixed: dict, state: list[torch.Tensor]):
        self.input_ids = input_ids.clone()
        # warm-up on a side stream (lazy cuBLAS / allocator set-up must not happen during capture), then put the
        # states back: the warm-up step must not count as a generated token
        saved = [tensor.clone() for tensor in state]
        stream = torch.cuda.Stream(device=input_ids.device)
        stream.wait_stream(torch.cuda.current_stream(input_ids.device))
        with torch.cuda.stream(stream):
            model(input_ids=self.input_ids, cache=cache, **fixed)
        torch.cuda.current_stream(input_ids.device).wait_stream(stream)
        for tensor, copy in zip(state, saved):
            tensor.copy_(copy)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = model(input_ids=self.input_ids, cache=cache, **fixed)

    def __call__(self, input_ids: torch.Tensor):
        self.input_ids.copy_(input_ids)
        self.graph.replay()
        # the graph rewrites its logits at every replay: hand out a copy that the caller may keep
        if isinstance(self.output, tuple):
            return (self.output[0].clone(), *self.output[1:])
        fields = dict(self.output.items())
        fields["logits"] = fields["logits"].clone()
        return type(self.output)(**fields)


class DecodeGraph:
    """`model(**step)` for generate's decode steps: CUDA-graphed one-token steps, everything else eager.

    One graph at a time, for the latest cache (a new `generate` call brings a new cache and captures anew, in the
    time of about one step); `replays` counts the graphed steps.
    """

    def __init__(self, model):
        self._model = weakref.ref(model)  # the model keeps its DecodeGraph, not the other way round
        self.key = None
        self.step: _CapturedStep | None = None
        self.replays = 0

    @property
    def model(self):
        return self._model()

    def __call__(self, *args, **kwargs):
        # generate passes the inputs a step does not use as None (pixel_values after the prefill, ...)
        kwargs = {name: value for name, value in kwargs.items() if value is not None}
        key = None if args else self._graph_key(kwargs)
        if key is None:
            return self.model(*args, **kwargs)
        if key != self.key:
            self.step, self.key = None, None  # free the old graph's memory pool before capturing the next
            fixed = {name: kwargs[name] for name in _FIXED_ARGUMENTS if name in kwargs}
            self.step = _CapturedStep(self.model, kwargs["cache"], kwargs["input_ids"], fixed, self._state)
            self.key = key
        self.replays += 1
        return self.step(kwargs["input_ids"])

    def _graph_key(self, kwargs: dict):
        """What the graph depends on, or None where the step must run eagerly."""
        input_ids, cache = kwargs.get("input_ids"), kwargs.get("cache")
        unknown = set(kwargs) - {"input_ids", "cache", *_FIXED_ARGUMENTS}
        if (
            unknown
            or self.model.training
            or cache is None
            or not isinstance(input_ids, torch.Tensor)
            or input_ids.device.type != "cuda"
            or input_ids.dim() != 2
            or input_ids.shape[1] != 1
            or not isinstance(kwargs.get("logits_to_keep", 0), int)
            or torch.is_grad_enabled() and any(p.requires_grad for p in self.model.parameters())
        ):
            return None
        state = _cache_tensors(cache)
        if state is None:
            return None
        self._state = state
        fixed = tuple(kwargs.get(name) for name in _FIXED_ARGUMENTS)
        return (id(cache), tuple(t.data_ptr() for t in state), tuple(input_ids.shape), fixed)


_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decode_graph(model) -> DecodeGraph:
    """The model's `DecodeGraph`, created on first use and kept beside the model (not in it: a model is copied and
    pickled without its graphs)."""
    if model not in _GRAPHS:
        _GRAPHS[model] = DecodeGraph(model)
    return _GRAPHS[model]
