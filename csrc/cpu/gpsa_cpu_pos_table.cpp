// The positional probabilities of a call, tabulated once per call when small enough (PosRows in
// gpsa_cpu.h): they do not depend on the batch.
#include "gpsa_cpu.h"

namespace convit_kernels::cpu {

// Above this many (H * N * N) entries the positional rows are recomputed on demand instead.
constexpr int64_t kMaxPosTable = int64_t(1) << 24;

template <typename T>
PosRows<T> make_pos_rows(const at::Tensor& pos_weight, int64_t rows, int64_t cols, bool with_means) {
  PosRows<T> pr;
  const int64_t N = rows * cols, H = pos_weight.size(0);
  auto opts = pos_weight.options();
  pr.N = N;
  pr.w_t = pos_weight.contiguous();
  pr.colj_t = at::empty({N}, opts);
  pr.rowj_t = at::empty({N}, opts);
  T* cj = pr.colj_t.template data_ptr<T>();
  T* rj = pr.rowj_t.template data_ptr<T>();
  for (int64_t j = 0; j < N; ++j) {
    cj[j] = T(j % cols);
    rj[j] = T(j / cols);
  }
  pr.w = pr.w_t.template const_data_ptr<T>();
  pr.colj = cj;
  pr.rowj = rj;
  if (H * N * N <= kMaxPosTable) {
    pr.table = at::empty({H, N, N}, opts);
    if (with_means) pr.mean_t = at::empty({H, N, 3}, opts);
    T* tab = pr.table.template data_ptr<T>();
    T* mean = with_means ? pr.mean_t.template data_ptr<T>() : nullptr;
    const T* w = pr.w;
    at::parallel_for(0, H * N, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t h = t / N, i = t % N;
        pos_softmax_row(w + 3 * h, cj, rj, cj[i], rj[i], N, tab + t * N);
        if (mean != nullptr) pos_row_mean(tab + t * N, cj, rj, cj[i], rj[i], N, mean + t * 3);
      }
    });
  }
  return pr;
}
template PosRows<float> make_pos_rows<float>(const at::Tensor&, int64_t, int64_t, bool);
template PosRows<double> make_pos_rows<double>(const at::Tensor&, int64_t, int64_t, bool);

}  // namespace convit_kernels::cpu
