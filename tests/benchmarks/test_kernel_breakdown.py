# benchmarks/kernel_breakdown.py: kernel names sorted into kinds, and the CPU fallback.
import torch


def test_kernel_names_fall_into_their_kinds(load_bench):
    kind_of = load_bench("kernel_breakdown").kind_of
    assert kind_of("_lce_dweight_kernel") == "olakernels (Triton)"
    assert kind_of("_embedding_distill_loss_fwd_kernel") == "olakernels (Triton)"
    assert kind_of("_rotary_embedding_kernel") == "olakernels (Triton)"
    assert kind_of("_silu_mul_bwd_kernel") == "olakernels (Triton)"
    assert kind_of("flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128>>") == "attention"
    assert kind_of("pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel") == "attention"
    assert kind_of("nvjet_tst_256x128_64x4_1x2_h_bz_coopA_NTN") == "GEMM"
    assert kind_of("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64") == "GEMM"
    assert kind_of("triton_poi_fused_mul_silu_0") == "other Triton"
    assert kind_of("void at::native::vectorized_elementwise_kernel<4, at::native::"
                   "BinaryFunctor<float>>") == "elementwise / reduce (aten)"
    assert kind_of("Memcpy HtoD (Pageable -> Device)") == "copy / memset"
    assert kind_of("some_unknown_kernel") == "other"


def test_without_device_times_it_says_so(load_bench):
    kernel_breakdown = load_bench("kernel_breakdown").kernel_breakdown
    calls = []
    out = kernel_breakdown(lambda: calls.append(torch.ones(4).sum()), lambda: calls.clear(),
                           "cpu")
    assert out.startswith("kernel breakdown: no device times")
    assert len(calls) == 1  # setup ran before the profiled call


def test_aten_and_inductor_kernels_are_not_counted_as_ours(load_bench):
    """Only our own kernels' names start with _layer_norm_/_gelu_; aten's and Inductor's
    layer-norm and gelu kernels contain them, and "scatter" contains "cat"."""
    kind_of = load_bench("kernel_breakdown").kind_of
    assert kind_of("_layer_norm_fwd_kernel") == "olakernels (Triton)"
    assert kind_of("_gelu_bwd_kernel") == "olakernels (Triton)"
    assert kind_of("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel"
                   "<c10::BFloat16, float>") == "elementwise / reduce (aten)"
    assert kind_of("triton_per_fused_native_layer_norm_backward_0") == "other Triton"
    assert kind_of("triton_poi_fused_gelu_gelu_backward_3") == "other Triton"
    assert kind_of("void at::native::_scatter_gather_elementwise_kernel<128, 4>") == \
        "elementwise / reduce (aten)"
    assert kind_of("void at::native::(anonymous namespace)::CatArrayBatchedCopy_contig<int, "
                   "unsigned int, 2, 128, 1>") == "copy / memset"
