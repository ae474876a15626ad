// CUDA implementations of fused_sched::cuda_grad_norm_tables_ and grad_norm_clip (schemas in csrc/fused_sched_ops.cpp):
// torch glue around the torch-free launchers of grad_norm.cu; common_torch.h says what the glue of every optimizer
// shares.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "common_torch.h"
#include "fused_sched/optim_math.h"
#include "optim_checks.h"
#include "grad_norm.h"

namespace fused_sched::cuda {
namespace {

int64_t grad_norm_tables_cuda(const at::Tensor& table, const at::Tensor& chunks, int64_t chunk_elements,
                              at::ScalarType grad_type, const at::Tensor& partials, int64_t slot_offset,
                              const at::Tensor& counter, const at::Tensor& out,
                              const std::optional<at::Tensor>& grad_scale, double norm_type, double max_norm,
                              bool finalize) {
  const Tables t = check_tables(table, chunks, chunk_elements);
  const at::Device device = table.device();
  TORCH_CHECK(norm_type > 0.0, "fused_sched: norm_type must be positive or inf, got ", norm_type);
  TORCH_CHECK(slot_offset >= 0, "fused_sched: slot_offset must not be negative, got ", slot_offset);
  // The launch uses at most max(1, n_chunks) slots (its grid, grad_norm_slots).
  TORCH_CHECK(partials.device() == device && partials.scalar_type() == at::kDouble && partials.is_contiguous() &&
                  partials.numel() >= slot_offset + std::max<int64_t>(1, t.n_chunks),
              "fused_sched: partials must be a contiguous float64 tensor on ", device, " of at least ",
              slot_offset + std::max<int64_t>(1, t.n_chunks), " elements, got ", partials.scalar_type(), " ",
              partials.sizes(), " on ", partials.device());
  TORCH_CHECK(out.device() == device && out.scalar_type() == at::kFloat && out.numel() == 2 && out.is_contiguous(),
              "fused_sched: out must be a contiguous two-element float32 tensor on ", device);
  int32_t* ticket = check_counter(counter, device);
  const float* scale = step_scalar<float>(grad_scale, at::kFloat, device, "grad_scale");
  const ParamDtype dtype = param_dtype(grad_type);
  const c10::cuda::CUDAGuard guard(device);
  int64_t slots = 0;
  C10_CUDA_CHECK(launch_grad_norm_tables(dtype, t.table, t.chunks, t.n_chunks, chunk_elements,
                                         partials.data_ptr<double>(), slot_offset, ticket, out.data_ptr<float>(),
                                         scale, norm_type, static_cast<float>(max_norm), finalize, &slots,
                                         c10::cuda::getCurrentCUDAStream(device.index()).stream()));
  return slots;
}

// fused_sched::grad_norm_clip for CUDA gradients (the optimizers' torch.compile path): the norm kernel over tables
// built for this call, one launch per non-empty bucket, the last finalizing, as the eager runner's norm pass does
// (the same chunk size and grid, so the same bits). bucket_sizes as in the CPU operator (an empty bucket adds
// nothing).
at::Tensor grad_norm_clip_cuda(at::TensorList grads, at::IntArrayRef bucket_sizes, double norm_type,
                               double max_norm, const std::optional<at::Tensor>& grad_scale) {
  check_norm_clip_args(bucket_sizes, grads.size(), norm_type);
  TORCH_CHECK(!grads.empty(), "fused_sched: the CUDA grad_norm_clip needs at least one gradient");
  const at::Device device = grads[0].device();
  TORCH_CHECK(device.is_cuda(), "fused_sched: the CUDA op got tensors on ", device);
  // Every check before anything is queued.
  std::vector<std::pair<int64_t, int64_t>> buckets;  // (first, count) of the non-empty buckets
  int64_t offset = 0;
  for (int64_t n : bucket_sizes) {
    if (n > 0) {
      const at::Tensor& first = grads[static_cast<size_t>(offset)];
      param_dtype(first.scalar_type());  // float32, bfloat16 or float16
      for (int64_t i = offset; i < offset + n; ++i) {
        const at::Tensor& g = grads[static_cast<size_t>(i)];
        TORCH_CHECK(g.device() == device && g.scalar_type() == first.scalar_type() &&
                        g.is_non_overlapping_and_dense(),
                    "fused_sched: grads[", i, "] must be a dense ", first.scalar_type(), " tensor on ", device);
      }
      buckets.emplace_back(offset, n);
    }
    offset += n;
  }
  const float* scale = step_scalar<float>(grad_scale, at::kFloat, device, "grad_scale");
  const c10::cuda::CUDAGuard guard(device);
  std::vector<DeviceTables> tables;
  int64_t slots = 0;
  for (const auto& [first, count] : buckets) {
    const at::TensorList members = grads.slice(static_cast<size_t>(first), static_cast<size_t>(count));
    tables.push_back(upload_tables(members, device, [&](size_t i, int64_t* row) {
      std::fill(row, row + kTableColumns, 0);
      row[kColGrad] = address(members[i]);
      row[kColNumel] = members[i].numel();
    }));
    slots += std::max<int64_t>(1, tables.back().n_chunks);  // a launch's grid is at most max(1, n_chunks)
  }
  at::Tensor partials = at::empty({slots}, at::TensorOptions().dtype(at::kDouble).device(device));
  at::Tensor counter = at::zeros({1}, at::TensorOptions().dtype(at::kInt).device(device));
  at::Tensor out = at::empty({2}, at::TensorOptions().dtype(at::kFloat).device(device));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  int64_t slot_offset = 0;
  for (size_t k = 0; k < tables.size(); ++k) {
    const DeviceTables& d = tables[k];
    int64_t used = 0;
    C10_CUDA_CHECK(launch_grad_norm_tables(
        param_dtype(grads[static_cast<size_t>(buckets[k].first)].scalar_type()), d.table, d.chunks, d.n_chunks,
        kDefaultChunkElements, partials.data_ptr<double>(), slot_offset, counter.data_ptr<int32_t>(),
        out.data_ptr<float>(), scale, norm_type, static_cast<float>(max_norm), k + 1 == tables.size(), &used,
        stream));
    slot_offset += used;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_sched, CUDA, m) {
  m.impl("cuda_grad_norm_tables_", &grad_norm_tables_cuda);
  m.impl("grad_norm_clip", &grad_norm_clip_cuda);
}

}  // namespace fused_sched::cuda
