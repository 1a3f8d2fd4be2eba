// Forgetting attention on CPU: FlashAttention-2 tiling with the forget-gate bias added per tile.
//
//   S_ij = scale * q_i . k_j + c_i - c_j  (start_i <= j <= i + Tk - Tq),   o_i = sum_j softmax_j(S_ij) v_j,
//   c = cumsum(log f) computed by the caller (fp32 / fp64).
//
// start_i (optional, int64 (B, Tq)): the first key query i may see -- the start of its document in a packed
// sequence, or the first real token of a left-padded prompt.  Keys before it are masked and whole tiles before the
// smallest start of a query block are skipped.  Without it, start_i = 0.
//
// Forward: for each (batch, head, query block), online softmax over key blocks up to the diagonal (tiles above it
// are never visited); saves the log-sum-exp.  Backward: for each (batch, head), recompute P = exp(S - lse) per tile,
// dV += P^T dO, dP = dO V^T, dS = P (dP - delta), dQ += scale dS K, dK += scale dS^T Q and dc_j -= sum_i dS_ij (the
// query-side term of dc is exactly zero).  Matrix products use the BLAS inside libtorch on strided views (last dim
// contiguous), so (B, T, H, D) projections viewed as (B, H, T, D) are read in place.  Masked entries use a large
// finite negative number, so the code is safe under -ffast-math.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

// The BLAS bundled with (and exported by) libtorch_cpu; column-major Fortran interface.
extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
}

// MKL's per-thread thread count (Fortran interface: by pointer); weak, so a libtorch built on another BLAS still
// loads this file.
extern "C" int mkl_set_num_threads_local_(const int*) __attribute__((weak));

namespace {

// The kernels parallelise over (batch, head, block) themselves; a BLAS that threads inside each worker
// oversubscribes the cores (measured: no speed-up at all from a second thread), so keep it sequential there.
struct SequentialBlas {
  int previous = 0;
  SequentialBlas() {
    const int one = 1;
    if (mkl_set_num_threads_local_) previous = mkl_set_num_threads_local_(&one);
  }
  ~SequentialBlas() {
    if (mkl_set_num_threads_local_) mkl_set_num_threads_local_(&previous);
  }
};

inline void blas_gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                      const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const int mi = m, ni = n, ki = k, la = lda, lb = ldb, lc = ldc;
  sgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, a, &la, b, &lb, &beta, c, &lc);
}

inline void blas_gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda,
                      const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  const int mi = m, ni = n, ki = k, la = lda, lb = ldb, lc = ldc;
  dgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, a, &la, b, &lb, &beta, c, &lc);
}

template <typename T>
struct Strided {  // a (B, H, T, D) tensor with a contiguous last dim
  T* data;
  int64_t sb, sh, st;
  explicit Strided(const at::Tensor& x)
      : data(x.data_ptr<T>()), sb(x.stride(0)), sh(x.stride(1)), st(x.stride(2)) {}
  T* at(int64_t b, int64_t h, int64_t t) const { return data + b * sb + h * sh + t * st; }
};

template <typename T>
constexpr T kMasked = T(-1e30);

// exp of an argument clamped to the normal range: vector exp falls back to a slow scalar path for lanes that
// underflow, and gate-decayed logits underflow a lot.  exp(-87) ~ 1.6e-38 (exp(-700) in fp64) is far below what a
// softmax row (sum >= 1) can resolve; masked entries are set to exactly 0 by the caller.
template <typename T>
constexpr T kMinExp = sizeof(T) == 4 ? T(-87) : T(-700);

template <typename T>
inline T clamped_exp(T x, bool keep) {
  return keep ? std::exp(std::max(x, kMinExp<T>)) : T(0);
}

// Row-major products through column-major BLAS (see the derivations in the comments of each call).
template <typename T>
inline void mm_abt(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b, int64_t ldb,
                   T beta, T* c, int64_t ldc) {  // C(m x n) = alpha A(m x k) B(n x k)^T + beta C
  blas_gemm('T', 'N', n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
}

template <typename T>
inline void mm_ab(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b, int64_t ldb,
                  T beta, T* c, int64_t ldc) {  // C(m x n) = alpha A(m x k) B(k x n) + beta C
  blas_gemm('N', 'N', n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
}

template <typename T>
inline void mm_atb(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b, int64_t ldb,
                   T beta, T* c, int64_t ldc) {  // C(m x n) = alpha A(k x m)^T B(k x n) + beta C
  blas_gemm('N', 'T', n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
}

// S (n x nk) = scale * Q[i0:i0+n] K[j0:j0+nk]^T + c_i - c_j, causal entries masked; query row r sits at key
// position off + i0 + r.
// ``starts`` (may be null): per query row of this (batch, head), the first visible key.
template <typename T>
inline void score_tile(T* S, const Strided<T>& Q, const Strided<T>& K, int64_t b, int64_t h, int64_t i0, int64_t n,
                       int64_t j0, int64_t nk, int64_t D, T scale, const T* c, int64_t off, const int64_t* starts) {
  mm_abt<T>(n, nk, D, scale, Q.at(b, h, i0), Q.st, K.at(b, h, j0), K.st, T(0), S, nk);
  for (int64_t r = 0; r < n; ++r) {
    T* row = S + r * nk;
    const int64_t pos = off + i0 + r;
    const T ci = c[pos];
    const int64_t allowed = std::max<int64_t>(0, std::min<int64_t>(nk, pos - j0 + 1));  // keys j0 .. pos
    const int64_t first = starts ? std::min<int64_t>(allowed, std::max<int64_t>(0, starts[i0 + r] - j0)) : 0;
    const T* cj = c + j0;
    for (int64_t t = 0; t < first; ++t) row[t] = kMasked<T>;
    for (int64_t t = first; t < allowed; ++t) row[t] += ci - cj[t];
    for (int64_t t = allowed; t < nk; ++t) row[t] = kMasked<T>;
  }
}

// The first key a query block [i0, i0 + n) needs: the smallest start among its rows (0 without starts).
inline int64_t first_key(const int64_t* starts, int64_t i0, int64_t n) {
  if (!starts) return 0;
  int64_t lo = starts[i0];
  for (int64_t r = 1; r < n; ++r) lo = std::min(lo, starts[i0 + r]);
  return std::max<int64_t>(lo, 0);
}

// Work items below this many multiply-adds in total run on the calling thread: waking the thread pool costs more
// than a decode step (one query row per head) computes.
constexpr int64_t kMinParallelWork = int64_t(1) << 17;

inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kMinParallelWork / std::max<int64_t>(1, work_per_item));
}

template <typename T>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& c,
                  const int64_t* sdata, double scale_d, at::Tensor& out, at::Tensor& lse, int64_t BM, int64_t BN) {
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), D = q.size(3), Tk = k.size(2), off = Tk - Tq;
  const T scale = static_cast<T>(scale_d);
  const Strided<T> Q(q), K(k), V(v), O(out);
  const T* cdata = c.data_ptr<T>();
  T* ldata = lse.data_ptr<T>();
  const int64_t nqb = (Tq + BM - 1) / BM;
  const int64_t grain = grain_for(std::min(BM, Tq) * Tk * D);
  at::parallel_for(0, B * H * nqb, grain, [&](int64_t begin, int64_t end) {
    SequentialBlas sequential;
    std::vector<T> S(BM * BN), acc(BM * D), m(BM), l(BM);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / (H * nqb), h = (idx / nqb) % H, i0 = (idx % nqb) * BM;
      const int64_t n = std::min(BM, Tq - i0), kend = off + i0 + n;
      const T* cb = cdata + (b * H + h) * Tk;
      const int64_t* sb = sdata ? sdata + b * Tq : nullptr;
      std::fill(m.begin(), m.end(), kMasked<T>);
      std::fill(l.begin(), l.end(), T(0));
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t j0 = first_key(sb, i0, n); j0 < kend; j0 += BN) {
        const int64_t nk = std::min(BN, kend - j0);
        score_tile<T>(S.data(), Q, K, b, h, i0, n, j0, nk, D, scale, cb, off, sb);
        for (int64_t r = 0; r < n; ++r) {
          T* row = S.data() + r * nk;
          T mx = m[r];
          for (int64_t t = 0; t < nk; ++t) mx = std::max(mx, row[t]);
          const T alpha = clamped_exp(m[r] - mx, true);
          T sum = 0;
          for (int64_t t = 0; t < nk; ++t) {
            const T p = clamped_exp(row[t] - mx, row[t] > kMasked<T>);
            row[t] = p;
            sum += p;
          }
          l[r] = l[r] * alpha + sum;
          m[r] = mx;
          T* a = acc.data() + r * D;
          for (int64_t d = 0; d < D; ++d) a[d] *= alpha;
        }
        mm_ab<T>(n, D, nk, T(1), S.data(), nk, V.at(b, h, j0), V.st, T(1), acc.data(), D);
      }
      for (int64_t r = 0; r < n; ++r) {
        T* o = O.at(b, h, i0 + r);
        const T inv = T(1) / l[r];
        const T* a = acc.data() + r * D;
        for (int64_t d = 0; d < D; ++d) o[d] = a[d] * inv;
        ldata[(b * H + h) * Tq + i0 + r] = m[r] + std::log(l[r]);
      }
    }
  });
}

template <typename T>
void backward_impl(const at::Tensor& go, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& c, const int64_t* sdata, const at::Tensor& out, const at::Tensor& lse,
                   double scale_d, at::Tensor& dq,
                   at::Tensor& dk, at::Tensor& dv, at::Tensor& dc, int64_t BM, int64_t BN) {
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), D = q.size(3), Tk = k.size(2), off = Tk - Tq;
  const T scale = static_cast<T>(scale_d);
  const Strided<T> Q(q), K(k), V(v), O(out), GO(go), DQ(dq), DK(dk), DV(dv);
  const T* cdata = c.data_ptr<T>();
  const T* ldata = lse.data_ptr<T>();
  T* dcdata = dc.data_ptr<T>();
  at::parallel_for(0, B * H, grain_for(Tq * Tk * D), [&](int64_t begin, int64_t end) {
    SequentialBlas sequential;
    std::vector<T> P(BM * BN), dP(BM * BN), delta(Tq);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const T* cb = cdata + bh * Tk;
      const T* lb = ldata + bh * Tq;
      T* dcb = dcdata + bh * Tk;
      const int64_t* sb = sdata ? sdata + b * Tq : nullptr;
      for (int64_t i = 0; i < Tq; ++i) {  // delta_i = dO_i . O_i
        const T* g = GO.at(b, h, i);
        const T* o = O.at(b, h, i);
        T s = 0;
        for (int64_t d = 0; d < D; ++d) s += g[d] * o[d];
        delta[i] = s;
      }
      for (int64_t i0 = 0; i0 < Tq; i0 += BM) {
        const int64_t n = std::min(BM, Tq - i0), kend = off + i0 + n;
        for (int64_t j0 = first_key(sb, i0, n); j0 < kend; j0 += BN) {
          const int64_t nk = std::min(BN, kend - j0);
          score_tile<T>(P.data(), Q, K, b, h, i0, n, j0, nk, D, scale, cb, off, sb);
          for (int64_t r = 0; r < n; ++r) {
            T* row = P.data() + r * nk;
            const T L = lb[i0 + r];
            for (int64_t t = 0; t < nk; ++t) row[t] = clamped_exp(row[t] - L, row[t] > kMasked<T>);
          }
          // dV(nk x D) += P^T dO ; dP(n x nk) = dO V^T
          mm_atb<T>(nk, D, n, T(1), P.data(), nk, GO.at(b, h, i0), GO.st, T(1), DV.at(b, h, j0), DV.st);
          mm_abt<T>(n, nk, D, T(1), GO.at(b, h, i0), GO.st, V.at(b, h, j0), V.st, T(0), dP.data(), nk);
          T* dcj = dcb + j0;
          for (int64_t r = 0; r < n; ++r) {  // dS = P (dP - delta), stored in dP; dc_j -= column sums
            T* ds = dP.data() + r * nk;
            const T* p = P.data() + r * nk;
            const T dl = delta[i0 + r];
            for (int64_t t = 0; t < nk; ++t) {
              ds[t] = p[t] * (ds[t] - dl);
              dcj[t] -= ds[t];
            }
          }
          mm_ab<T>(n, D, nk, scale, dP.data(), nk, K.at(b, h, j0), K.st, T(1), DQ.at(b, h, i0), DQ.st);
          mm_atb<T>(nk, D, n, scale, dP.data(), nk, Q.at(b, h, i0), Q.st, T(1), DK.at(b, h, j0), DK.st);
        }
      }
    }
  });
}

void check(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), name, " must be on CPU");
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1, name, " must be (B, H, T, D) with a contiguous last dim");
}

// starts: an empty tensor (no segments) or a contiguous int64 (B, Tq) tensor.
const int64_t* starts_ptr(const at::Tensor& starts, const at::Tensor& q) {
  if (starts.numel() == 0) return nullptr;
  TORCH_CHECK(starts.scalar_type() == at::kLong && starts.is_contiguous() && starts.dim() == 2 &&
                  starts.size(0) == q.size(0) && starts.size(1) == q.size(2),
              "starts must be a contiguous int64 (B, Tq) tensor");
  return starts.data_ptr<int64_t>();
}

}  // namespace

std::vector<at::Tensor> fox_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& c, const at::Tensor& starts, double scale, int64_t block_m,
                                    int64_t block_n) {
  check(q, "q"), check(k, "k"), check(v, "v");
  TORCH_CHECK(c.is_contiguous() && c.scalar_type() == q.scalar_type(), "c must be contiguous with q's dtype");
  auto out = at::empty_like(q);
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "fox_forward", [&] {
    forward_impl<scalar_t>(q, k, v, c, starts_ptr(starts, q), scale, out, lse, block_m, block_n);
  });
  return {out, lse};
}

std::vector<at::Tensor> fox_backward(const at::Tensor& go, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& c, const at::Tensor& starts,
                                     const at::Tensor& out, const at::Tensor& lse, double scale, int64_t block_m,
                                     int64_t block_n) {
  check(go, "grad_out"), check(q, "q"), check(k, "k"), check(v, "v"), check(out, "out");
  auto dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v), dc = at::zeros_like(c);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "fox_backward", [&] {
    backward_impl<scalar_t>(go, q, k, v, c, starts_ptr(starts, q), out, lse, scale, dq, dk, dv, dc, block_m,
                            block_n);
  });
  return {dq, dk, dv, dc};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &fox_forward, "forgetting attention forward (CPU)");
  m.def("backward", &fox_backward, "forgetting attention backward (CPU)");
}
