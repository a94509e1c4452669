// The compiled module psld_fast._C: argument validation shared by the CPU and CUDA kernels, and a
// minimal Python module init.
//
// The op schemas are defined once, in Python (psld_fast/ops.py, torch.library); the kernels only
// register implementations (TORCH_LIBRARY_IMPL at the end of affine_step_cpu.cpp / _cuda.cu), which
// run as static initialisers when Python imports this module.  We include ATen + torch/library.h
// and Python.h instead of torch/extension.h (pybind11): the build is ~4x faster and nothing here
// needs pybind11.
#include <Python.h>

#include <cstdint>
#include <optional>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "affine_step.h"

namespace psld_fast {

namespace {

bool is_kernel_float(c10::ScalarType t) {
  return t == c10::ScalarType::Float || t == c10::ScalarType::Half ||
         t == c10::ScalarType::BFloat16;
}

void check_eps(const at::Tensor& u, const at::Tensor& e) {
  TORCH_CHECK(e.sizes() == u.sizes(), "affine_step_: eps must have u's shape ", u.sizes(),
              ", got ", e.sizes());
  TORCH_CHECK(e.device() == u.device(), "affine_step_: eps is on ", e.device(), " but u is on ",
              u.device());
  TORCH_CHECK(is_kernel_float(e.scalar_type()),
              "affine_step_: eps must be float32, float16 or bfloat16, got ", e.scalar_type());
}

}  // namespace

AffineStepParams make_affine_step_params(const at::Tensor& u, const std::optional<at::Tensor>& eps,
                                         const at::Tensor& seeds, c10::ArrayRef<double> coef,
                                         int64_t step, int64_t stream, c10::DeviceType device_type,
                                         at::Tensor& eps_holder) {
  TORCH_CHECK(u.device().type() == device_type, "affine_step_: u is on ", u.device(),
              " but this kernel runs on ", c10::DeviceTypeName(device_type, true),
              " (all tensors must be on one device)");
  TORCH_CHECK(u.dim() >= 2 && u.size(1) % 2 == 0,
              "affine_step_: u must be a (B, 2C, ...) state with an even channel count, got shape ",
              u.sizes());
  TORCH_CHECK(is_kernel_float(u.scalar_type()), "affine_step_: u has dtype ", u.scalar_type(),
              "; the kernels support float32, float16 and bfloat16 (use backend='reference' for "
              "float64)");
  TORCH_CHECK(u.is_contiguous(), "affine_step_: u must be contiguous (got strides ", u.strides(),
              " for shape ", u.sizes(), "); the op updates u in place, so keep the state contiguous");
  TORCH_CHECK(seeds.scalar_type() == c10::ScalarType::Long && seeds.dim() == 1 &&
                  seeds.size(0) == u.size(0),
              "affine_step_: seeds must be int64 of shape (", u.size(0), ",), got ",
              seeds.scalar_type(), " of shape ", seeds.sizes());
  TORCH_CHECK(seeds.device() == u.device(), "affine_step_: seeds is on ", seeds.device(),
              " but u is on ", u.device());
  TORCH_CHECK(coef.size() == kNumCoef, "affine_step_: coef must hold 16 numbers, got ",
              coef.size());

  AffineStepParams p;
  p.batch = u.size(0);
  p.half_numel = p.batch == 0 ? 0 : u.numel() / (2 * p.batch);
  TORCH_CHECK(p.half_numel < (int64_t(1) << 32), "affine_step_: ", p.half_numel,
              " elements per half exceed the 32-bit Philox counter");
  p.eps_sample_stride = 2 * p.half_numel;
  p.eps_m_offset = p.half_numel;
  for (int i = 0; i < kNumCoef; ++i) p.coef[i] = static_cast<float>(coef[i]);
  p.read_state = coef[kP00] != 0.0 || coef[kP01] != 0.0 || coef[kP10] != 0.0 || coef[kP11] != 0.0;
  p.has_noise = false;
  for (int i = kR1_00; i < kNumCoef; ++i) p.has_noise = p.has_noise || coef[i] != 0.0;
  p.has_second_draw = false;
  for (int i = kR2_00; i < kNumCoef; ++i) p.has_second_draw = p.has_second_draw || coef[i] != 0.0;
  p.step = static_cast<uint32_t>(step);      // = step & 0xFFFFFFFF, as the reference
  p.stream = static_cast<uint32_t>(stream);
  p.u = u.data_ptr();
  TORCH_CHECK(seeds.is_contiguous(), "affine_step_: seeds must be contiguous, got strides ",
              seeds.strides());
  p.seeds = seeds.data_ptr<int64_t>();
  p.state_dtype = u.scalar_type();
  if (eps.has_value()) {
    check_eps(u, *eps);
    eps_holder = eps->contiguous();
    p.eps = eps_holder.data_ptr();
    p.has_eps = true;
    p.eps_dtype = eps_holder.scalar_type();
  }
  return p;
}

AffineStepParams make_lifted_step_params(const at::Tensor& u, const std::optional<at::Tensor>& d,
                                         const std::optional<at::Tensor>& y, const at::Tensor& seeds,
                                         c10::ArrayRef<double> coef, int64_t step, int64_t stream,
                                         c10::DeviceType device_type, at::Tensor& d_holder) {
  TORCH_CHECK(coef.size() == kNumLiftedCoef, "lifted_step_: coef must hold 16 numbers (P, G, R1, R2, W), got ",
              coef.size());
  // The equivalent plain step: Q = [[G0, 0], [G1, 0]] applied to eps = (d, d).
  double plain[kNumCoef];
  for (int i = 0; i < 4; ++i) plain[i] = coef[i];
  plain[kQ00] = coef[4];
  plain[kQ01] = 0.0;
  plain[kQ10] = coef[5];
  plain[kQ11] = 0.0;
  for (int i = 0; i < 8; ++i) plain[kR1_00 + i] = coef[6 + i];
  at::Tensor no_holder;
  AffineStepParams p = make_affine_step_params(u, std::nullopt, seeds, c10::ArrayRef<double>(plain, kNumCoef),
                                               step, stream, device_type, no_holder);
  std::vector<int64_t> half(u.sizes().begin(), u.sizes().end());
  half[1] /= 2;
  if (d.has_value()) {
    TORCH_CHECK(d->sizes() == c10::IntArrayRef(half), "lifted_step_: d must have the shape of one half of u ",
                c10::IntArrayRef(half), ", got ", d->sizes());
    TORCH_CHECK(d->device() == u.device(), "lifted_step_: d is on ", d->device(), " but u is on ", u.device());
    TORCH_CHECK(is_kernel_float(d->scalar_type()), "lifted_step_: d must be float32, float16 or bfloat16, got ",
                d->scalar_type());
    d_holder = d->contiguous();
    p.eps = d_holder.data_ptr();
    p.has_eps = true;
    p.eps_dtype = d_holder.scalar_type();
    p.eps_sample_stride = p.half_numel;
    p.eps_m_offset = 0;
  }
  if (y.has_value()) {
    TORCH_CHECK(y->sizes() == c10::IntArrayRef(half), "lifted_step_: y must have the shape of one half of u ",
                c10::IntArrayRef(half), ", got ", y->sizes());
    TORCH_CHECK(y->device() == u.device(), "lifted_step_: y is on ", y->device(), " but u is on ", u.device());
    TORCH_CHECK(y->scalar_type() == u.scalar_type(), "lifted_step_: y must have u's dtype ", u.scalar_type(),
                ", got ", y->scalar_type());
    TORCH_CHECK(y->is_contiguous(), "lifted_step_: y must be contiguous (it is written in place)");
    p.y = y->data_ptr();
    p.has_y = true;
    p.wy0 = static_cast<float>(coef[14]);
    p.wy1 = static_cast<float>(coef[15]);
  }
  return p;
}

void add_ms_params(AffineStepParams& p, const at::Tensor& u, const at::Tensor& dbuf,
                   c10::ArrayRef<double> ms, bool record, bool lifted) {
  const char* op = lifted ? "lifted_ms_step_" : "ms_step_";
  const size_t want = lifted ? 2 : 6;
  TORCH_CHECK(ms.size() == want, op, ": ms must hold ", want,
              lifted ? " numbers (g0 g1), got " : " numbers (g0 g1 a0 a1 c0 c1), got ", ms.size());
  std::vector<int64_t> half(u.sizes().begin(), u.sizes().end());
  half[1] /= 2;
  TORCH_CHECK(dbuf.sizes() == c10::IntArrayRef(half), op, ": dbuf must have the shape of one half of u ",
              c10::IntArrayRef(half), ", got ", dbuf.sizes());
  TORCH_CHECK(dbuf.device() == u.device(), op, ": dbuf is on ", dbuf.device(), " but u is on ", u.device());
  TORCH_CHECK(dbuf.scalar_type() == c10::ScalarType::Float, op, ": dbuf must be float32 (the data estimate "
              "is kept in the compute dtype), got ", dbuf.scalar_type());
  TORCH_CHECK(dbuf.is_contiguous(), op, ": dbuf must be contiguous (it is read and written in place)");
  TORCH_CHECK(!dbuf.is_same(u), op, ": dbuf must not be u");
  p.dbuf = static_cast<float*>(dbuf.data_ptr());
  p.g0 = static_cast<float>(ms[0]);
  p.g1 = static_cast<float>(ms[1]);
  p.has_dprev = ms[0] != 0.0 || ms[1] != 0.0;
  p.has_drec = record;
  if (!record) return;
  if (lifted) {
    TORCH_CHECK(p.has_eps, op, ": record=True needs d (the call's data estimate)");
    p.c0 = 1.0f;  // eps is d for both halves: D = 1 * d, exactly
    return;
  }
  p.a0 = static_cast<float>(ms[2]);
  p.a1 = static_cast<float>(ms[3]);
  p.c0 = static_cast<float>(ms[4]);
  p.c1 = static_cast<float>(ms[5]);
  TORCH_CHECK(p.has_eps || (ms[4] == 0.0 && ms[5] == 0.0), op,
              ": record=True with eps coefficients c0, c1 needs eps");
  p.drec_reads_state = ms[2] != 0.0 || ms[3] != 0.0;
}

void check_philox_test_args(const at::Tensor& seeds, int64_t numel, c10::DeviceType device_type) {
  TORCH_CHECK(seeds.device().type() == device_type, "philox_test: seeds is on ", seeds.device());
  TORCH_CHECK(seeds.scalar_type() == c10::ScalarType::Long && seeds.dim() == 1,
              "philox_test: seeds must be a 1-d int64 tensor, got ", seeds.scalar_type(),
              " of shape ", seeds.sizes());
  TORCH_CHECK(numel >= 0 && numel < (int64_t(1) << 32), "philox_test: numel must be in [0, 2^32), got ",
              numel);
}

}  // namespace psld_fast

#ifndef PSLD_FAST_WITH_CUDA
#define PSLD_FAST_WITH_CUDA 0
#endif

namespace {

PyObject* py_cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(psld_fast::cpu_isa_name()); }

PyObject* py_set_cpu_isa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  PyObject* previous = PyUnicode_FromString(psld_fast::cpu_isa_name());
  if (!psld_fast::set_cpu_isa(name)) {
    Py_XDECREF(previous);
    PyErr_Format(PyExc_ValueError,
                 "set_cpu_isa: %s is not one of avx512, avx2, baseline that this CPU supports", name);
    return nullptr;
  }
  return previous;
}

PyMethodDef kMethods[] = {
    {"cpu_isa", py_cpu_isa, METH_NOARGS,
     "cpu_isa() -> str: the CPU kernel's instruction-set path (avx512, avx2 or baseline)."},
    {"set_cpu_isa", py_set_cpu_isa, METH_O,
     "set_cpu_isa(name) -> str: switch the CPU kernel's path (tests, benchmarks); returns the "
     "previous one.  ValueError for a path this CPU cannot run."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// Importing psld_fast._C loads this library, which runs the TORCH_LIBRARY_IMPL registrations.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                   "psld_fast compiled kernels (registered as torch ops)", -1,
                                   kMethods};
  PyObject* m = PyModule_Create(&module_def);
  if (m != nullptr && PyModule_AddIntConstant(m, "WITH_CUDA", PSLD_FAST_WITH_CUDA) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
