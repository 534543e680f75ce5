// instructlm::SlotAttention: onnxruntime CPU custom op for the served graph (export/graphs.py, ServedGraph with
// attention="slot"). Attention over the serving engine's slot KV cache, read in place.
//
// Inputs
//   0 q            float [B, S, H*D]    rotated queries, softmax scale already folded in
//   1 k            float [B, S, KV, D]  rotated keys of the new tokens
//   2 v            float [B, S, KV, D]  values of the new tokens
//   3 past_key     float [slots, KV, L, D]  the runner's whole cache of this layer (bound once, never copied)
//   4 past_value   float [slots, KV, L, D]
//   5 slot_ids     int64 [R]            cache slot of each row
//   6 position_ids int64 [B, S]         each token's position
//   7 seq_lens     int64 [R]            tokens of each row
// Output
//   0 out          float [B, S, H*D]    zero for tokens after the last row
//
// Rows are runs of consecutive tokens of the B*S flattened tokens: row r is seq_lens[r] tokens from
// sum(seq_lens[:r]) on, its positions start_r.. (start_r = its first token's position). The engine packs a
// step's decode rows and prefill chunks into B = 1 this way, so no row is padded to another's length.
// Query s of row r attends to positions 0..start_r-1 of its slot and to the row's new tokens 0..s (causal). Query heads h = g*rep + r share KV head g (rep = H/KV), so each key and value
// row is read once for its rep heads. Nothing is copied: the gather and concatenation the standard-op graph
// needs (a copy of the past per layer and call, then a second one with the new tokens appended) are what this
// op exists to remove. The new keys/values are not written here: the graph returns them and the runner writes
// them into the cache after the call, so the op has no side effects on its inputs.
//
// Built by export/custom_ops.py against onnxruntime's C/C++ API headers (ABI-stable: a library built against
// API version N loads into any onnxruntime >= N).

#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// One build that runs everywhere and uses AVX-512 / AVX2+FMA where the CPU has them (chosen at load time).
#define INSTRUCTLM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define INSTRUCTLM_CLONES
#endif

constexpr int kQueryBlock = 8;  // queries of one row processed together, so each key/value row is loaded once
constexpr int64_t kAhead = 8;   // software prefetch distance, in cache positions
constexpr int kTile = 16;       // prefill: key positions per score tile (one AVX-512 vector)
constexpr int kLaneGroup = 8;   // prefill: (query, head) lanes accumulated together, kept in registers
constexpr int64_t kTransposeFrom = 4;  // chunks of at least this many new tokens take the transposed path

// e^x for x <= 0 (scores minus their row maximum): 2^n * e^r with |r| <= ln2/2, Taylor series to r^6
// (relative error about 1e-7); written so the compiler vectorizes it (std::exp is a scalar library call).
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = std::floor(x * 1.44269504f + 0.5f);
  const float r = x - n * 0.693145752f - n * 1.42860677e-6f;  // ln 2 split in two for precision
  const float p =
      1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720))))));
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

struct Shape {
  int64_t B, S, H, KV, D, slots, L;
};

struct Task {
  Shape g;
  const float *q, *k, *v, *kc, *vc;
  // per row (a run of consecutive tokens): cache slot, first position, token count, first token's index
  const int64_t *slot_ids, *starts, *counts, *first;
  int64_t rows;
  float* out;
};

// Rows [qb] of one (row b, KV head g) block: queries s0..s0+qb-1. DT is D when known at compile time.
template <int DT>
INSTRUCTLM_CLONES void attend_block(const Task& t, int64_t b, int64_t g, int64_t s0, int qb, float* scores,
                                    const float* kt, int64_t kt_stride) {
  const Shape& sh = t.g;
  const int64_t D = DT ? DT : sh.D;
  const int rep = static_cast<int>(sh.H / sh.KV);
  const int64_t start = t.starts[b];
  const int64_t span = start + s0 + qb;  // positions the block's last query sees
  const float* kc = t.kc + ((t.slot_ids[b] * sh.KV + g) * sh.L) * D;
  const float* vc = t.vc + ((t.slot_ids[b] * sh.KV + g) * sh.L) * D;
  const int lanes = qb * rep;  // (query, head) pairs, lane = i*rep + r
  const float* qrow[kQueryBlock * 16];
  float* orow[kQueryBlock * 16];
  for (int i = 0; i < qb; ++i) {
    for (int r = 0; r < rep; ++r) {
      const int64_t off = ((t.first[b] + s0 + i) * sh.H + g * rep + r) * D;
      qrow[i * rep + r] = t.q + off;
      orow[i * rep + r] = t.out + off;
    }
  }
  // scores[lane * span + l]
  if (kt != nullptr) {
    // Prefill: keys transposed ([D][kt_stride], zero past the pair's last position), so a tile of kTile
    // positions is a contiguous vector and each (query, head) lane accumulates kTile scores with plain
    // multiply-adds, where the row-wise dot products below each end in a horizontal sum. Positions a lane
    // may not see are computed too and never read (its softmax stops at its own length).
    for (int lane0 = 0; lane0 < lanes; lane0 += kLaneGroup) {
      const int nl = lanes - lane0 < kLaneGroup ? lanes - lane0 : kLaneGroup;
      for (int64_t l0 = 0; l0 < span; l0 += kTile) {
        float acc[kLaneGroup][kTile] = {};
        for (int64_t d = 0; d < D; ++d) {
          const float* col = kt + d * kt_stride + l0;
          for (int i = 0; i < nl; ++i) {
            const float a = qrow[lane0 + i][d];
            for (int j = 0; j < kTile; ++j) acc[i][j] += a * col[j];
          }
        }
        const int64_t w = span - l0 < kTile ? span - l0 : kTile;
        for (int i = 0; i < nl; ++i) std::memcpy(scores + (lane0 + i) * span + l0, acc[i], sizeof(float) * w);
      }
    }
  }
  for (int64_t l = 0; kt == nullptr && l < span; ++l) {
    const float* kr = l < start ? kc + l * D : t.k + ((t.first[b] + (l - start)) * sh.KV + g) * D;
    if (l + kAhead < start) {
      // The cache rows come from memory, not cache, in a real step (the weights evict them): ask for the
      // key row kAhead positions on, and this position's value row, read after the softmax.
      for (int64_t c = 0; c < D; c += 16) {
        __builtin_prefetch(kc + (l + kAhead) * D + c);
        __builtin_prefetch(vc + l * D + c);
      }
    }
    // query i sees l when l <= start + s0 + i
    const int first = l < start + s0 ? 0 : static_cast<int>(l - start - s0);
    for (int lane = first * rep; lane < lanes; ++lane) {
      const float* qr = qrow[lane];
      float acc = 0.f;
      for (int64_t d = 0; d < D; ++d) acc += qr[d] * kr[d];
      scores[lane * span + l] = acc;
    }
  }
  float inv_sum[kQueryBlock * 16];
  for (int lane = 0; lane < lanes; ++lane) {
    const int64_t n = start + s0 + lane / rep + 1;
    float* row = scores + lane * span;
    float m = row[0];
    int64_t l = 0;
    if (n >= kTile) {  // elementwise maxima over tiles vectorize (a max reduction would not, without -ffast-math)
      float mv[kTile];
      std::memcpy(mv, row, sizeof mv);
      for (l = kTile; l + kTile <= n; l += kTile) {
        for (int j = 0; j < kTile; ++j) mv[j] = row[l + j] > mv[j] ? row[l + j] : mv[j];
      }
      for (int j = 0; j < kTile; ++j) m = mv[j] > m ? mv[j] : m;
    }
    for (; l < n; ++l) m = row[l] > m ? row[l] : m;
    float sum = 0.f;
    for (int64_t l = 0; l < n; ++l) {
      const float e = exp_nonpositive(row[l] - m);
      row[l] = e;
      sum += e;
    }
    inv_sum[lane] = 1.f / sum;  // applied to the output, not to every weight
    for (int64_t l = n; l < span; ++l) row[l] = 0.f;  // positions this query may not see weigh nothing
  }
  // out[lane] = sum_l p[lane][l] * v[l], a group of lanes at a time: with D known the group's accumulators
  // stay in registers while the value rows stream past (8 lanes x 32 floats = 16 AVX-512 registers).
  for (int lane0 = 0; lane0 < lanes; lane0 += kLaneGroup) {
    const int nl = lanes - lane0 < kLaneGroup ? lanes - lane0 : kLaneGroup;
    float acc[kLaneGroup][DT ? DT : 1];
    float* out[kLaneGroup];
    for (int i = 0; i < nl; ++i) {
      out[i] = orow[lane0 + i];
      if (DT) {
        for (int64_t d = 0; d < D; ++d) acc[i][d] = 0.f;
      } else {
        std::memset(out[i], 0, sizeof(float) * D);
      }
    }
    for (int64_t l = 0; l < span; ++l) {
      const float* vr = l < start ? vc + l * D : t.v + ((t.first[b] + (l - start)) * sh.KV + g) * D;
      for (int i = 0; i < nl; ++i) {
        const float p = scores[(lane0 + i) * span + l];
        if (DT) {
          for (int64_t d = 0; d < D; ++d) acc[i][d] += p * vr[d];
        } else {
          for (int64_t d = 0; d < D; ++d) out[i][d] += p * vr[d];
        }
      }
    }
    for (int i = 0; i < nl; ++i) {
      const float inv = inv_sum[lane0 + i];
      if (DT) {
        for (int64_t d = 0; d < D; ++d) out[i][d] = acc[i][d] * inv;
      } else {
        for (int64_t d = 0; d < D; ++d) out[i][d] *= inv;
      }
    }
  }
}

// Ask for the first cache rows of pair `index` (the in-loop prefetch starts kAhead positions in).
void prefetch_pair(const Task& t, size_t index) {
  if (index >= static_cast<size_t>(t.rows * t.g.KV)) return;
  const int64_t b = static_cast<int64_t>(index) / t.g.KV, g = static_cast<int64_t>(index) % t.g.KV;
  const int64_t off = ((t.slot_ids[b] * t.g.KV + g) * t.g.L) * t.g.D;
  const int64_t rows = t.starts[b] < kAhead ? t.starts[b] : kAhead;
  for (int64_t c = 0; c < rows * t.g.D; c += 16) {
    __builtin_prefetch(t.kc + off + c);
    __builtin_prefetch(t.vc + off + c);
  }
}

// One (row, KV head) pair: every block of its queries.
void attend_pair(void* data, size_t index) {
  const Task& t = *static_cast<const Task*>(data);
  prefetch_pair(t, index + 1);  // pairs run in order on a thread: the next one's rows arrive meanwhile
  const int64_t b = static_cast<int64_t>(index) / t.g.KV, g = static_cast<int64_t>(index) % t.g.KV;
  const int64_t n = t.counts[b];
  const int rep = static_cast<int>(t.g.H / t.g.KV);
  const int64_t D = t.g.D, total = t.starts[b] + n;
  thread_local std::vector<float> scores, kt;
  scores.resize(static_cast<size_t>(kQueryBlock * rep) * total);
  const float* ktp = nullptr;
  const int64_t stride = (total + kTile - 1) / kTile * kTile;
  if (n >= kTransposeFrom) {
    // Prefill chunk: transpose this pair's keys once (past from the cache, then the new tokens); every query
    // block of the chunk reuses them.
    kt.assign(static_cast<size_t>(D * stride), 0.f);
    const float* kc = t.kc + ((t.slot_ids[b] * t.g.KV + g) * t.g.L) * D;
    for (int64_t l = 0; l < total; ++l) {
      const float* kr = l < t.starts[b] ? kc + l * D : t.k + ((t.first[b] + (l - t.starts[b])) * t.g.KV + g) * D;
      for (int64_t d = 0; d < D; ++d) kt[d * stride + l] = kr[d];
    }
    ktp = kt.data();
  }
  for (int64_t s0 = 0; s0 < n; s0 += kQueryBlock) {
    const int qb = static_cast<int>(n - s0 < kQueryBlock ? n - s0 : kQueryBlock);
    switch (t.g.D) {
      case 32: attend_block<32>(t, b, g, s0, qb, scores.data(), ktp, stride); break;
      case 64: attend_block<64>(t, b, g, s0, qb, scores.data(), ktp, stride); break;
      case 128: attend_block<128>(t, b, g, s0, qb, scores.data(), ktp, stride); break;
      default: attend_block<0>(t, b, g, s0, qb, scores.data(), ktp, stride);
    }
  }
}

OrtStatus* error(const std::string& msg) {
  return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, ("SlotAttention: " + msg).c_str());
}

std::string dims(const std::vector<int64_t>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

struct Kernel {
  OrtStatus* ComputeV2(OrtKernelContext* context) {
    try {
      return compute(context);
    } catch (const Ort::Exception& e) {
      return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
    } catch (const std::exception& e) {
      return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
    }
  }

  OrtStatus* compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    auto q = ctx.GetInput(0), k = ctx.GetInput(1), v = ctx.GetInput(2);
    auto pk = ctx.GetInput(3), pv = ctx.GetInput(4), sid = ctx.GetInput(5), pos = ctx.GetInput(6);
    auto len = ctx.GetInput(7);
    const auto qs = q.GetTensorTypeAndShapeInfo().GetShape();
    const auto ks = k.GetTensorTypeAndShapeInfo().GetShape();
    const auto vs = v.GetTensorTypeAndShapeInfo().GetShape();
    const auto ps = pk.GetTensorTypeAndShapeInfo().GetShape();
    const auto pvs = pv.GetTensorTypeAndShapeInfo().GetShape();
    const auto ss = sid.GetTensorTypeAndShapeInfo().GetShape();
    const auto pss = pos.GetTensorTypeAndShapeInfo().GetShape();
    const auto ls = len.GetTensorTypeAndShapeInfo().GetShape();
    if (qs.size() != 3 || ks.size() != 4 || ps.size() != 4) {
      return error("q must be [B, S, H*D], k/v [B, S, KV, D] and the past [slots, KV, L, D]; got q " +
                   dims(qs) + ", k " + dims(ks) + ", past_key " + dims(ps));
    }
    Shape g{qs[0], qs[1], 0, ps[1], ps[3], ps[0], ps[2]};
    if (g.D <= 0 || qs[2] % g.D || ks != vs || ps != pvs || ks[0] != g.B || ks[1] != g.S || ks[2] != g.KV ||
        ks[3] != g.D || ss.size() != 1 || ls != ss || pss != std::vector<int64_t>{g.B, g.S}) {
      return error("inconsistent shapes: q " + dims(qs) + ", k " + dims(ks) + ", v " + dims(vs) +
                   ", past_key " + dims(ps) + ", past_value " + dims(pvs) + ", slot_ids " + dims(ss) +
                   ", position_ids " + dims(pss) + ", seq_lens " + dims(ls));
    }
    g.H = qs[2] / g.D;
    if (g.KV <= 0 || g.H % g.KV || g.H / g.KV > 16) {
      return error(std::to_string(g.H) + " query heads over " + std::to_string(g.KV) +
                   " KV heads (need a whole number of query heads per KV head, at most 16)");
    }
    const int64_t* slot_ids = sid.GetTensorData<int64_t>();
    const int64_t* p = pos.GetTensorData<int64_t>();
    const int64_t* lens = len.GetTensorData<int64_t>();
    const int64_t rows = ss[0], tokens = g.B * g.S;
    std::vector<int64_t> starts(rows), counts(rows), first(rows);
    int64_t t0 = 0;
    for (int64_t r = 0; r < rows; ++r) {
      const std::string row = "row " + std::to_string(r);
      if (lens[r] < 1 || t0 + lens[r] > tokens) {
        return error(row + ": " + std::to_string(lens[r]) + " tokens from token " + std::to_string(t0) +
                     " do not fit the call's " + std::to_string(tokens) + " tokens");
      }
      first[r] = t0;
      counts[r] = lens[r];
      starts[r] = p[t0];
      t0 += lens[r];
      if (slot_ids[r] < 0 || slot_ids[r] >= g.slots) {
        return error(row + ": slot " + std::to_string(slot_ids[r]) + " is outside 0.." +
                     std::to_string(g.slots - 1));
      }
      if (starts[r] < 0 || starts[r] + counts[r] > g.L) {
        return error(row + ": positions " + std::to_string(starts[r]) + ".." +
                     std::to_string(starts[r] + counts[r] - 1) + " are outside the cache's 0.." +
                     std::to_string(g.L - 1));
      }
    }
    auto out = ctx.GetOutput(0, qs);
    float* o = out.GetTensorMutableData<float>();
    if (t0 < tokens) {  // tokens after the last row: padding
      std::memset(o + t0 * g.H * g.D, 0, sizeof(float) * (tokens - t0) * g.H * g.D);
    }
    Task t{g,
           q.GetTensorData<float>(),
           k.GetTensorData<float>(),
           v.GetTensorData<float>(),
           pk.GetTensorData<float>(),
           pv.GetTensorData<float>(),
           slot_ids,
           starts.data(),
           counts.data(),
           first.data(),
           rows,
           o};
    const size_t pairs = static_cast<size_t>(rows * g.KV);
    prefetch_pair(t, 0);
    if (pairs == 1) {
      attend_pair(&t, 0);
    } else {
      // onnxruntime's intra-op pool (the session's intra_op_num_threads); inline with one thread.
      ctx.ParallelFor(attend_pair, pairs, 0, &t);
    }
    return nullptr;
  }
};

struct Op : Ort::CustomOpBase<Op, Kernel, true> {
  OrtStatus* CreateKernelV2(const OrtApi&, const OrtKernelInfo*, void** kernel) const {
    *kernel = new Kernel();
    return nullptr;
  }
  const char* GetName() const { return "SlotAttention"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 8; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return i < 5 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace

// onnxruntime calls this when a session registers the library (SessionOptions.register_custom_ops_library).
extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    return nullptr;  // cannot even report: an onnxruntime older than the headers this was built with
  }
  Ort::InitApi(api);
  static Op op;
  static Ort::CustomOpDomain* domain = nullptr;
  static std::once_flag once;
  try {
    std::call_once(once, [] {
      domain = new Ort::CustomOpDomain("ai.instructlm");  // lives as long as the process, as sessions need
      domain->Add(&op);
    });
    Ort::UnownedSessionOptions(options).Add(*domain);
  } catch (const Ort::Exception& e) {
    return api->CreateStatus(e.GetOrtErrorCode(), e.what());
  }
  return nullptr;
}
