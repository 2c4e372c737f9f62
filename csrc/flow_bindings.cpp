// Python bindings of the flow SDE step (FlowArgs and its entry points), added to module _C by
// bindings.cpp. The GIL is released while a kernel runs.
#include <pybind11/pybind11.h>

#include "flow_core.h"

namespace py = pybind11;

namespace ddpo {
namespace {

template <void (*Fn)(const FlowArgs&)>
void flow_without_gil(const FlowArgs& args) {
  py::gil_scoped_release release;
  Fn(args);
}

}  // namespace

void bind_flow(py::module_& m) {
  py::class_<FlowArgs>(m, "FlowArgs")
      .def(py::init<>())
#define DDPO_FLOW_FIELD(name) .def_readwrite(#name, &FlowArgs::name)
      DDPO_FLOW_FIELD(batch) DDPO_FLOW_FIELD(numel) DDPO_FLOW_FIELD(compute)
      DDPO_FLOW_FIELD(sde_type) DDPO_FLOW_FIELD(noise_level) DDPO_FLOW_FIELD(sigma_max)
      DDPO_FLOW_FIELD(cfg) DDPO_FLOW_FIELD(guidance_scale)
      DDPO_FLOW_FIELD(model_output) DDPO_FLOW_FIELD(model_output_dtype) DDPO_FLOW_FIELD(sample)
      DDPO_FLOW_FIELD(sample_dtype) DDPO_FLOW_FIELD(sigma) DDPO_FLOW_FIELD(sigma_prev)
      DDPO_FLOW_FIELD(prev_sample) DDPO_FLOW_FIELD(prev_sample_dtype) DDPO_FLOW_FIELD(sample_noise)
      DDPO_FLOW_FIELD(noise) DDPO_FLOW_FIELD(noise_dtype) DDPO_FLOW_FIELD(seed) DDPO_FLOW_FIELD(offset)
      DDPO_FLOW_FIELD(log_prob) DDPO_FLOW_FIELD(prev_sample_mean) DDPO_FLOW_FIELD(std_dev_t)
      DDPO_FLOW_FIELD(old_log_prob) DDPO_FLOW_FIELD(advantages) DDPO_FLOW_FIELD(ppo_clip_range)
      DDPO_FLOW_FIELD(adv_clip_max) DDPO_FLOW_FIELD(loss) DDPO_FLOW_FIELD(approx_kl) DDPO_FLOW_FIELD(clipfrac)
      DDPO_FLOW_FIELD(dloss_dlogp)
      DDPO_FLOW_FIELD(reference_output) DDPO_FLOW_FIELD(reference_output_dtype) DDPO_FLOW_FIELD(kl)
      DDPO_FLOW_FIELD(kl_beta) DDPO_FLOW_FIELD(kl_mean) DDPO_FLOW_FIELD(grad_kl)
      DDPO_FLOW_FIELD(grad_prev_sample) DDPO_FLOW_FIELD(grad_prev_sample_dtype)
      DDPO_FLOW_FIELD(grad_prev_sample_mean) DDPO_FLOW_FIELD(grad_prev_sample_mean_dtype)
      DDPO_FLOW_FIELD(grad_log_prob) DDPO_FLOW_FIELD(grad_model_output)
      DDPO_FLOW_FIELD(workspace) DDPO_FLOW_FIELD(stream) DDPO_FLOW_FIELD(device);
#undef DDPO_FLOW_FIELD
  m.def("flow_forward_cpu", &flow_without_gil<flow_forward_cpu>);
  m.def("flow_backward_cpu", &flow_without_gil<flow_backward_cpu>);
#ifdef DDPO_WITH_CUDA
  m.def("flow_forward_cuda", &flow_without_gil<flow_forward_cuda>);
  m.def("flow_backward_cuda", &flow_without_gil<flow_backward_cuda>);
#endif
}

}  // namespace ddpo
