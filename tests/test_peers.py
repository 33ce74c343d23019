"""Other systems' layer splits (engine.placement.peers): each follows its source's rule on examples small enough to
check by hand, and `price` turns a split into a plan of Strata's cost model."""
from __future__ import annotations

import pytest

from engine.placement import DeviceInfo, GiB, ModelCost, stage_fits
from engine.placement.peers import (ORDERS, PEERS, accelerate_split, exo_split, llama_cpp_split, price,
                                    vllm_split)

MiB = 1 << 20
LAYER = 4_000_000  # bytes of one layer of small(): 1M fp32 weights


def device(name: str = "cpu", *, memory: int = 8 * GiB, host: str = "h") -> DeviceInfo:
    kind = "cuda" if name.startswith("cuda") else "cpu"
    return DeviceInfo(name=name, kind=kind, host=host, label=kind.upper(), memory=memory, matmul_flops=1e11,
                      mem_bandwidth=2e10, op_overhead_s=2e-6)


def model(layers: int = 8, *, hidden: int = 512, params: int = 3_000_000, vocab: int = 8000,
          tied: bool = False) -> ModelCost:
    return ModelCost(num_layers=layers, hidden_size=hidden, vocab_size=vocab, layer_params=params,
                     layer_out_features=4 * hidden, kv_elems_per_token=hidden // 2,
                     elementwise_elems_per_token=40 * hidden, fused_elementwise_elems_per_token=16 * hidden,
                     embed_params=vocab * hidden, head_params=vocab * hidden + hidden, tied_embeddings=tied,
                     compute_dtype="float32", weight_dtype="float32")


def small(layers: int, tied: bool = False) -> ModelCost:
    """Layers of 4,000,000 bytes; embedding 256,000; LM head 256,000 plus a 256-byte norm."""
    return model(layers, hidden=64, params=1_000_000, vocab=1000, tied=tied)


def test_small_model_sizes():
    cost = small(4)
    assert (cost.layer_weight_bytes, cost.embed_bytes, cost.head_bytes) == (LAYER, 256_000, 256_256)


def test_registry():
    assert list(PEERS) == ["Accelerate (infer_auto_device_map)", "exo (memory-weighted ring)",
                           "llama.cpp (--tensor-split by VRAM)", "vLLM (even pipeline split)"]
    assert set(ORDERS) == set(PEERS)
    devices = [device("cuda:0", memory=GiB), device("cuda:1", memory=2 * GiB), device("cpu", memory=4 * GiB)]
    for who, split in PEERS.items():
        counts = split(model(12), devices)
        assert len(counts) == len(devices) and sum(counts) == 12 and min(counts) >= 0, who
        assert sorted(ORDERS[who](devices)) == [0, 1, 2], who


# ---- vLLM: get_pp_indices ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layers,ranks,expected", [
    (10, 3, [3, 4, 3]),  # the remainder goes to partitions[-2]
    (22, 4, [5, 6, 6, 5]),  # two left over: partitions[-2] and [-3], neither end
    (4, 3, [1, 2, 1]),  # vLLM's own test_uneven_auto_partition goldens from here on
    (5, 3, [2, 2, 1]),  # pp_size - 1 left over: the first rank takes one, the last never
    (3, 2, [2, 1]),
    (12, 4, [3, 3, 3, 3]),
])
def test_vllm_even_split(layers, ranks, expected):
    assert vllm_split(model(layers), [device(f"cuda:{i}") for i in range(ranks)]) == expected


def test_vllm_ignores_memory():
    devices = [device("cuda:0", memory=GiB), device("cuda:1", memory=64 * GiB), device("cpu", memory=2 * GiB)]
    assert vllm_split(model(10), devices) == [3, 4, 3]


# ---- exo: memory-weighted ring ----------------------------------------------------------------------------------

def test_exo_proportional_to_memory():
    devices = [device("cuda:0", memory=2 * GiB), device("cuda:1", memory=GiB), device("cpu", memory=GiB)]
    assert exo_split(model(8), devices) == [4, 2, 2]


def test_exo_counts_come_back_in_listed_order():
    # The ring starts at the largest node; the counts are still per listed device.
    devices = [device("cuda:0", memory=GiB), device("cuda:1", memory=2 * GiB), device("cpu", memory=GiB)]
    assert exo_split(model(8), devices) == [2, 4, 2]
    assert ORDERS["exo (memory-weighted ring)"](devices)[0] == 1


def test_exo_rounding_puts_the_remainder_last():
    # Partitions end at 0.33333, 0.66666, 0.99999: int(3.3333) - 1 = 2, int(6.6666) - 1 = 5, the last runs to 9.
    devices = [device("cuda:0", memory=GiB), device("cuda:1", memory=GiB), device("cpu", memory=GiB)]
    assert exo_split(model(10), devices) == [3, 3, 4]


def test_exo_truncation_can_leave_the_largest_node_empty():
    # 999:998:3 MB over 2 layers: the first partition [0, 0.4995) maps to layers 0..int(0.999) - 1 = -1, none.
    devices = [device("cuda:0", memory=999 * MiB), device("cuda:1", memory=998 * MiB), device("cpu", memory=3 * MiB)]
    assert exo_split(model(2), devices) == [0, 1, 1]


# ---- llama.cpp: --tensor-split by free memory ------------------------------------------------------------------

def test_llama_cpp_equal_gpus_give_the_output_slot_to_the_last():
    # -ngl 9 (all 8 layers and the output): layer il goes to upper_bound([0.5, 1], il / 9), so 0-4 | 5-7 + output.
    assert llama_cpp_split(model(8), [device("cuda:0"), device("cuda:1")]) == [5, 3]


def test_llama_cpp_proportional_to_vram():
    # Split points 0.25, 0.5, 1 over il / 12: layers 0-2 | 3-5 | 6-10 and the output.
    devices = [device("cuda:0", memory=GiB), device("cuda:1", memory=GiB), device("cuda:2", memory=2 * GiB)]
    assert llama_cpp_split(model(11), devices) == [3, 3, 5]
    # 3:1 over 8 layers: il / 9 < 0.75 for layers 0-6, so the second GPU has layer 7 and the output.
    assert llama_cpp_split(model(8), [device("cuda:0", memory=3 * GiB), device("cuda:1", memory=GiB)]) == [7, 1]


def test_llama_cpp_cpu_keeps_the_first_layers():
    cost = small(8)
    gpu = 5 * LAYER + cost.head_bytes  # five layers and the output layer
    # -ngl 6: i_gpu_start = 9 - 6 = 3, so layers 0-2 stay on the CPU and 3-7 with the output go to the GPU.
    assert llama_cpp_split(cost, [device("cuda:0", memory=gpu), device("cpu", memory=100 * LAYER)]) == [5, 3]
    assert llama_cpp_split(cost, [device("cuda:0", memory=gpu - 1), device("cpu", memory=100 * LAYER)]) == [4, 4]
    # The CPU runs first: its layers come first.
    assert ORDERS["llama.cpp (--tensor-split by VRAM)"]([device("cuda:0"), device("cpu")]) == [1, 0]


def test_llama_cpp_cannot_place():
    cost = small(8)
    gpu = 5 * LAYER + cost.head_bytes
    assert llama_cpp_split(cost, [device("cuda:0", memory=gpu)]) is None  # no CPU to keep the rest
    assert llama_cpp_split(cost, [device("cuda:0", memory=gpu), device("cpu", memory=LAYER)]) is None
    assert llama_cpp_split(cost, [device("cpu", memory=LAYER)]) is None
    assert llama_cpp_split(cost, [device("cpu", memory=100 * LAYER)]) == [8]


def test_llama_cpp_cpus_of_other_hosts_join_the_split():
    # A second host's CPU is an rpc-server device: it takes a share of the split like a GPU.
    devices = [device("cuda:0", memory=GiB), device("cpu", memory=GiB, host="b")]
    assert llama_cpp_split(model(8), devices) == [5, 3]


# ---- Accelerate: infer_auto_device_map ---------------------------------------------------------------------------

def test_accelerate_fills_the_first_gpu_keeping_the_largest_layer_free():
    # cuda:0 holds 10.5 layers: the embedding and 9 layers fit under 10.5 - 1 (the buffer), a 10th does not.
    cost = small(16)
    devices = [device("cuda:0", memory=int(10.5 * LAYER)), device("cuda:1", memory=100 * LAYER)]
    assert accelerate_split(cost, devices) == [9, 7]


def test_accelerate_buffer_on_first_gpu_and_cpu_only():
    # cuda:0 keeps a layer free (2 layers under 3.1 - 1), cuda:1 keeps none (5 under 5.05), the CPU takes the rest.
    cost = small(16)
    devices = [device("cuda:0", memory=int(3.1 * LAYER)), device("cuda:1", memory=int(5.05 * LAYER)),
               device("cpu", memory=100 * LAYER)]
    assert accelerate_split(cost, devices) == [2, 5, 9]


def test_accelerate_keeps_no_buffer_when_the_model_fits_whole():
    # `model` is tested whole against the largest module after it (lm_head): 4.064 layers fit under 4.2 - 0.064.
    cost = small(4)
    assert accelerate_split(cost, [device("cuda:0", memory=int(4.2 * LAYER)), device("cuda:1")]) == [4, 0]


def test_accelerate_largest_layer_can_be_the_lm_head_and_tied_weights_count_once():
    # Embedding and LM head 16,384,000 bytes each, layers 4,000,000, cuda:0 48,000,000.
    devices = [device("cuda:0", memory=48_000_000), device("cuda:1", memory=100 * LAYER)]
    # Untied: the buffer is the LM head's size: 16.384 + 3 * 4 <= 48 - 16.384.
    assert accelerate_split(model(8, params=1_000_000), devices) == [3, 5]
    # Tied: lm_head weighs nothing; once the embedding is placed the buffer is one layer: 16.384 + 6 * 4 <= 44.
    assert accelerate_split(model(8, params=1_000_000, tied=True), devices) == [6, 2]


def test_accelerate_gpus_by_index_and_one_machine():
    cost = small(16)
    devices = [device("cuda:1", memory=100 * LAYER), device("cuda:0", memory=int(10.5 * LAYER))]
    assert accelerate_split(cost, devices) == [7, 9]  # cuda:0 is filled first
    # Devices on another host are out of reach.
    assert accelerate_split(cost, [device("cuda:0", memory=int(10.5 * LAYER)),
                                   device("cuda:0", memory=100 * LAYER, host="b")]) is None


def test_accelerate_cannot_place_without_disk():
    cost = small(16)
    assert accelerate_split(cost, [device("cuda:0", memory=5 * LAYER), device("cuda:1", memory=5 * LAYER)]) is None
    assert accelerate_split(cost, [device("cuda:0", memory=5 * LAYER), device("cpu", memory=5 * LAYER)]) is None


# ---- price ---------------------------------------------------------------------------------------------------------

PLAN = dict(batch_size=4, context_len=64, kv_reserve_tokens=16, block_size=16)


def test_price_drops_empty_devices():
    cost = small(4)
    devices = [device("cuda:0", memory=int(4.2 * LAYER)), device("cuda:1")]
    counts = accelerate_split(cost, devices)
    assert counts == [4, 0]
    priced = price(cost, devices, counts, **PLAN)
    assert [s.layers for s in priced.stages] == [(0, 4)]
    assert [s.device_index for s in priced.stages] == [0]


def test_price_follows_the_split_in_listed_or_given_order():
    cost = model(10)
    devices = [device("cuda:0"), device("cuda:1"), device("cpu")]
    priced = price(cost, devices, [3, 4, 3], **PLAN)
    assert [s.num_layers for s in priced.stages] == [3, 4, 3]
    assert [s.layers for s in priced.stages] == [(0, 3), (3, 7), (7, 10)]
    assert priced.bottleneck_s > 0 and priced.batch_size == 4
    reordered = price(cost, devices, [3, 4, 3], order=[2, 0, 1], **PLAN)
    assert [(s.device_index, s.num_layers) for s in reordered.stages] == [(2, 3), (0, 3), (1, 4)]


def test_price_none_when_a_stage_overflows():
    cost = small(8)
    # The CPU holds the embedding and the 3 layers llama.cpp leaves it, but not those layers and the LM head.
    devices = [device("cuda:0", memory=5 * LAYER + cost.head_bytes), device("cpu", memory=3 * LAYER + 256_100)]
    counts = llama_cpp_split(cost, devices)
    assert counts == [5, 3]
    assert stage_fits(cost, devices[1], 3, False, True, 0) is False  # in Strata's order the CPU holds the head
    assert price(cost, devices, counts, **PLAN) is None
    # In llama.cpp's order the CPU is first (embedding) and the GPU last (head): that fits, without KV.
    order = ORDERS["llama.cpp (--tensor-split by VRAM)"](devices)
    no_kv = {**PLAN, "kv_reserve_tokens": 0}
    assert [s.num_layers for s in price(cost, devices, counts, order=order, **no_kv).stages] == [3, 5]
    assert price(cost, devices, counts, order=order, **PLAN) is None


def test_price_rejects_mismatched_counts():
    with pytest.raises(ValueError):
        price(model(4), [device("cuda:0")], [2, 2], **PLAN)
