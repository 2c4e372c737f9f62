// pybind11 module ddpo_fast._C: the DdimArgs struct and the entry points of each backend.
// The GIL is released while a kernel runs, so reward threads and data loading go on meanwhile.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cpu/cpu_isa.h"
#include "cpu/noise_stream.h"
#include "cpu/thread_pool.h"
#include "ddim_core.h"

namespace py = pybind11;
namespace ddpo { void bind_flow(py::module_& m); }  // flow_bindings.cpp
using ddpo::DdimArgs;

namespace {

template <void (*Fn)(const DdimArgs&)>
void without_gil(const DdimArgs& args) {
  py::gil_scoped_release release;
  Fn(args);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ddpo_fast compiled core: fused DDIM step with log-probability and clipped PPO loss";

  py::class_<DdimArgs>(m, "DdimArgs")
      .def(py::init<>())
#define DDPO_FIELD(name) .def_readwrite(#name, &DdimArgs::name)
      DDPO_FIELD(batch) DDPO_FIELD(numel) DDPO_FIELD(compute)
      DDPO_FIELD(eta) DDPO_FIELD(cfg) DDPO_FIELD(guidance_scale) DDPO_FIELD(prediction)
      DDPO_FIELD(clip_sample) DDPO_FIELD(clip_sample_range) DDPO_FIELD(use_clipped_model_output)
      DDPO_FIELD(model_output) DDPO_FIELD(model_output_dtype) DDPO_FIELD(sample) DDPO_FIELD(sample_dtype)
      DDPO_FIELD(alpha_t) DDPO_FIELD(alpha_prev)
      DDPO_FIELD(prev_sample) DDPO_FIELD(prev_sample_dtype) DDPO_FIELD(sample_noise)
      DDPO_FIELD(noise) DDPO_FIELD(noise_dtype) DDPO_FIELD(seed) DDPO_FIELD(offset)
      DDPO_FIELD(log_prob)
      DDPO_FIELD(old_log_prob) DDPO_FIELD(advantages) DDPO_FIELD(ppo_clip_range) DDPO_FIELD(adv_clip_max)
      DDPO_FIELD(loss) DDPO_FIELD(approx_kl) DDPO_FIELD(clipfrac) DDPO_FIELD(dloss_dlogp)
      DDPO_FIELD(reference_output) DDPO_FIELD(reference_output_dtype) DDPO_FIELD(kl) DDPO_FIELD(kl_beta)
      DDPO_FIELD(kl_mean) DDPO_FIELD(grad_kl)
      DDPO_FIELD(grad_prev_sample) DDPO_FIELD(grad_prev_sample_dtype) DDPO_FIELD(grad_log_prob)
      DDPO_FIELD(grad_model_output) DDPO_FIELD(grad_direction)
      DDPO_FIELD(workspace) DDPO_FIELD(stream) DDPO_FIELD(device);
#undef DDPO_FIELD

  m.def("ddim_forward_cpu", &without_gil<ddpo::ddim_forward_cpu>);
  m.def("ddim_backward_cpu", &without_gil<ddpo::ddim_backward_cpu>);
  m.def("ppo_forward_cpu", &without_gil<ddpo::ppo_forward_cpu>);
#ifdef DDPO_WITH_CUDA
  m.def("ddim_forward_cuda", &without_gil<ddpo::ddim_forward_cuda>);
  m.def("ddim_backward_cuda", &without_gil<ddpo::ddim_backward_cuda>);
  m.def("ppo_forward_cuda", &without_gil<ddpo::ppo_forward_cuda>);
  m.def("built_with_cuda", [] { return true; });
#else
  m.def("built_with_cuda", [] { return false; });
#endif

  py::class_<ddpo::NoiseStream>(m, "NoiseStream",
                                "CPU sampling step computed while its noise tensor is filled (see noise_stream.h)")
      .def(py::init<const DdimArgs&>())
      .def("publish", &ddpo::NoiseStream::publish)
      .def("cancel", &ddpo::NoiseStream::cancel)
      .def("finish", &ddpo::NoiseStream::finish, py::call_guard<py::gil_scoped_release>());

  m.def("chunks_per_sample", &ddpo::chunks_per_sample, "CUDA workspace entries per sample");
  m.def("set_num_threads", &ddpo::set_num_threads);
  m.def("num_threads", &ddpo::num_threads);
  m.def("cpu_isa", &ddpo::cpu_isa, "the instruction-set variant of the CPU kernels in use");
  m.def("set_cpu_isa", &ddpo::set_cpu_isa);
  m.def("supported_cpu_isas", &ddpo::supported_cpu_isas);
  ddpo::bind_flow(m);  // the flow SDE step (Flow-GRPO)
}
