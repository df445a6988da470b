"""generate() with a static cache: the decode steps go through `DecodeGraph` (CUDA-graphed on a GPU, eager
elsewhere) and produce exactly the tokens of the default (dynamic cache, eager) generation.

The capture itself needs a GPU; those tests skip without one. On the CPU transformers only routes the decode steps
through `get_compiled_call` when told to compile on every device (`CompileConfig._compile_all_devices`), which is how
the routing is checked here.
"""

import copy

import pytest
import torch
from transformers.generation import CompileConfig

from test_modeling_visualrwkv import images, prompt
from test_modeling_visualrwkv import tiny_model as tiny_vlm
from test_ops_kernels import tiny_model as tiny_text_model
from visualrwkv_hf.decode_graph import DecodeGraph, decode_graph

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graphs)")


def compile_everywhere() -> CompileConfig:
    config = CompileConfig()
    config._compile_all_devices = True  # transformers' own switch for routing CPU decode steps like CUDA ones
    return config


def test_model_answers_generate_with_its_decode_graph():
    model = tiny_text_model()
    graph = model.get_compiled_call(CompileConfig())
    assert isinstance(graph, DecodeGraph) and graph is decode_graph(model) and graph.model is model
    # kept beside the model, not in it: copies and pickles of the model carry no graph
    assert "_decode_graph" not in vars(model) and copy.deepcopy(model) is not None


def test_static_cache_generation_equals_default_on_cpu():
    model = tiny_text_model()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    expected = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False, cache_implementation="static"), expected)
    graph = decode_graph(model)
    before = graph.replays
    routed = model.generate(
        ids, max_new_tokens=8, do_sample=False, cache_implementation="static", compile_config=compile_everywhere()
    )
    assert torch.equal(routed, expected)
    assert graph.replays == before  # the CPU runs the decode steps eagerly


def test_vlm_static_cache_generation_equals_default_on_cpu(monkeypatch):
    steps = []
    graph_key = DecodeGraph._graph_key

    def record(self, kwargs):
        steps.append(kwargs)
        return graph_key(self, kwargs)

    monkeypatch.setattr(DecodeGraph, "_graph_key", record)
    model = tiny_vlm()
    ids = prompt(3, 4, model.config.num_image_tokens)
    pixel_values = images(1)
    expected = model.generate(input_ids=ids, pixel_values=pixel_values, max_new_tokens=6, do_sample=False)
    routed = model.generate(
        input_ids=ids, pixel_values=pixel_values, max_new_tokens=6, do_sample=False, cache_implementation="static",
        compile_config=compile_everywhere(),
    )
    assert torch.equal(routed, expected)
    # every decode step reached the graph with nothing but what a captured step takes (on a GPU: graphed)
    assert len(steps) == 5
    for step in steps:
        assert set(step) <= {"input_ids", "cache", "use_cache", "return_dict", "logits_to_keep"}
        assert step["input_ids"].shape == (1, 1) and step["cache"] is not None


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_steps_equal_eager_steps(dtype):
    model = tiny_text_model().to("cuda", dtype)
    ids = torch.randint(0, 64, (2, 30), device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
    eager_cache, graph = copy.deepcopy(cache), DecodeGraph(model)
    token = torch.randint(0, 64, (2, 1), device="cuda", generator=torch.Generator("cuda").manual_seed(4))
    with torch.no_grad():
        for _ in range(5):
            eager = model(input_ids=token, cache=eager_cache, use_cache=True, return_dict=True, logits_to_keep=1)
            graphed = graph(input_ids=token, cache=cache, use_cache=True, return_dict=True, logits_to_keep=1)
            torch.testing.assert_close(graphed.logits, eager.logits, rtol=0, atol=0)
            token = eager.logits[:, -1:].argmax(-1)
    assert graph.replays == 5
    for layer, eager_layer in zip(cache.layers, eager_cache.layers):
        for i in layer.recurrent_states:
            assert torch.equal(layer.recurrent_states[i], eager_layer.recurrent_states[i])
            assert torch.equal(layer.conv_states[i], eager_layer.conv_states[i])
        assert int(layer.cumulative_length_linear) == int(eager_layer.cumulative_length_linear) == 35


@needs_cuda
def test_cuda_generate_with_static_cache_replays_the_graph():
    model = tiny_text_model().cuda()
    graph = decode_graph(model)
    for seed in (5, 6):  # a second call brings a new cache: captured anew, still exact
        ids = torch.randint(0, 64, (2, 9), device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
        expected = model.generate(ids, max_new_tokens=10, do_sample=False)
        before = graph.replays
        assert torch.equal(model.generate(ids, max_new_tokens=10, do_sample=False, cache_implementation="static"),
                           expected)
        assert graph.replays - before == 9  # every step after the prefill


@needs_cuda
def test_cuda_vlm_generate_with_static_cache_replays_the_graph():
    model = tiny_vlm().cuda()
    ids, pixel_values = prompt(3, 4, model.config.num_image_tokens).cuda(), images(1).cuda()
    expected = model.generate(input_ids=ids, pixel_values=pixel_values, max_new_tokens=6, do_sample=False)
    routed = model.generate(input_ids=ids, pixel_values=pixel_values, max_new_tokens=6, do_sample=False,
                            cache_implementation="static")
    assert torch.equal(routed, expected)
    assert decode_graph(model).replays == 5
