// Host runs of the __host__ __device__ code behind the CUDA kernels
// (lorakern/common.h, nf4_decode.h, cuda_nf4_bodies.h), built with
// g++ -fsanitize=address,undefined by tests/test_cuda_kernels.py.
//
// The program only computes; it never judges. Inputs come from raw little-endian
// files written by the pytest test, outputs go back the same way, and the test
// compares them with lorakern.formats.nf4 / lorakern.reference. Kernel bodies run
// under a minimal emulation: loops over (CTA, thread) or (row, lane) in place of
// the grid, one loop boundary per __syncthreads, and a plain sum over lanes in
// place of the warp-shuffle reduction.
//
// Usage (DIR holds the files named below):
//   nf4_host codes   DIR                    -> codes.u32      bits of nf4_code(0..15)
//   nf4_host nibbles DIR                    packed.u8 -> nib.u8, word_nib.u8 (nf4_nibble / word_nibble)
//   nf4_host absmax  DIR NBLOCKS            absmax.u8 nested.f32 code.f32 offset.f32 -> absmax.f32
//   nf4_host mix32   DIR                    in.u32 -> out.u32
//   nf4_host dropout DIR SEED P ROWS COLS   -> keep.u8
//   nf4_host convert DIR                    in.f32 -> bf16.u16 f16.u16; h.u16 -> h2f.f32
//   nf4_host dequant DIR NUMEL BLOCKSIZE DQ DTYPE SHIFT_IN SHIFT_OUT   -> out.bin
//   nf4_host gemv    DIR M N K R BLOCKSIZE DQ DTYPE HAS_BIAS SCALING P SEED VEC   -> y.bin xa.bin
//                    (VEC: 0 nibble path, 1 16-byte loads, 2 16-byte loads with x staged)
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "lorakern/common.h"
#include "lorakern/cuda_nf4_bodies.h"
#include "lorakern/nf4_decode.h"

using namespace lorakern;

namespace {

std::string g_dir;

template <typename T>
std::vector<T> read_file(const std::string& name) {
  const std::string path = g_dir + "/" + name;
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) throw std::runtime_error("cannot open " + path);
  std::fseek(f, 0, SEEK_END);
  const long bytes = std::ftell(f);
  std::fseek(f, 0, SEEK_SET);
  if (bytes < 0 || bytes % static_cast<long>(sizeof(T)) != 0) throw std::runtime_error("bad size of " + path);
  std::vector<T> v(static_cast<size_t>(bytes) / sizeof(T));
  if (!v.empty() && std::fread(v.data(), sizeof(T), v.size(), f) != v.size()) throw std::runtime_error("short read " + path);
  std::fclose(f);
  return v;
}

template <typename T>
void write_file(const std::string& name, const T* data, size_t n) {
  const std::string path = g_dir + "/" + name;
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) throw std::runtime_error("cannot write " + path);
  if (n && std::fwrite(data, sizeof(T), n, f) != n) throw std::runtime_error("short write " + path);
  std::fclose(f);
}

int64_t arg_i(char** argv, int i) { return std::strtoll(argv[i], nullptr, 10); }

int log2_of(int64_t v) {
  int l = 0;
  while ((int64_t{1} << l) < v) ++l;
  return l;
}

// The NF4 weight files of DIR, kept alive with the view that points into them.
struct Weight {
  std::vector<uint8_t> packed, absmax_q;
  std::vector<float> absmax_f32, nested, code, offset;
  NF4View view{};

  Weight(int64_t numel, int64_t blocksize, bool dq, int shift) {
    const std::vector<uint8_t> raw = read_file<uint8_t>("packed.u8");
    // Copy into a buffer that starts `shift` bytes past a 16-byte boundary, so
    // the unaligned-load path runs when shift != 0 (malloc aligns to 16).
    packed.assign(raw.size() + 16, 0);
    std::memcpy(packed.data() + shift, raw.data(), raw.size());
    view.packed = packed.data() + shift;
    if (dq) {
      absmax_q = read_file<uint8_t>("absmax.u8");
      nested = read_file<float>("nested.f32");
      code = read_file<float>("code.f32");
      offset = read_file<float>("offset.f32");
      view.absmax_q = absmax_q.data();
      view.nested_absmax = nested.data();
      view.nested_code = code.data();
      view.offset = offset.data();
    } else {
      absmax_f32 = read_file<float>("absmax.f32");
      view.absmax_f32 = absmax_f32.data();
    }
    view.numel = numel;
    view.log2_blocksize = log2_of(blocksize);
  }
};

// ------------------------------------------------------------------------- dequantize

template <DType D>
void run_dequant(const Weight& w, bool vec_in, int shift_out) {
  using T = typename Elem<D>::T;
  const int64_t numel = w.view.numel;
  // Output with room for a misaligned start and poisoned, so unwritten elements show.
  std::vector<uint8_t> buf((numel + 16) * sizeof(T), 0xFF);
  T* out = reinterpret_cast<T*>(buf.data() + shift_out * sizeof(T));
  DequantArgs a{};
  a.q = w.view;
  a.out = out;
  a.vec_in = vec_in;
  a.vec_out = shift_out == 0;
  DequantShared s;
  for (int64_t tile = 0; tile < dequant_tiles(numel); ++tile) {
    std::memset(&s, 0xFF, sizeof(s));  // garbage a real CTA could find in shared memory
    for (int t = 0; t < kDequantThreads; ++t) dequant_stage(a, tile, t, s);
    for (int t = 0; t < kDequantThreads; ++t) dequant_emit<D>(a, tile, t, s);
  }
  write_file("out.bin", out, static_cast<size_t>(numel));
  // The bytes outside [out, out + numel) must be untouched.
  for (size_t i = 0; i < buf.size(); ++i) {
    const uint8_t* p = buf.data() + i;
    if ((p < reinterpret_cast<uint8_t*>(out) || p >= reinterpret_cast<uint8_t*>(out + numel)) && *p != 0xFF)
      throw std::runtime_error("dequant wrote outside the output at byte " + std::to_string(i));
  }
}

// ------------------------------------------------------------------------------- GEMV

template <int MT, DType D>
void run_gemv(const GemvArgs& a, const std::vector<uint8_t>& lora_a, float dropout_p, int64_t seed, bool shared_x) {
  using T = typename Elem<D>::T;
  std::vector<float> partial;
  int ksplit = 0;
  if (a.r > 0) {
    ksplit = lora_ksplit(a.m, a.k, a.r);
    partial.assign(static_cast<size_t>(ksplit) * a.m * a.r, -1.0f);
    LoraDownArgs d{};
    d.x = a.x;
    d.lora_a = lora_a.data();
    d.seed = &seed;
    d.partial = partial.data();
    d.k = a.k;
    d.kchunk = lora_kchunk(a.k, ksplit);
    d.m = a.m;
    d.r = a.r;
    d.ksplit = ksplit;
    d.dropout = dropout_p > 0.0f;
    d.threshold = dropout_threshold(dropout_p);
    d.keep_scale = static_cast<float>(1.0 / (1.0 - static_cast<double>(dropout_p)));
    const uint32_t key = mix32(static_cast<uint32_t>(seed));
    for (int jg = 0; jg < (a.r + kLoraRanksPerCta - 1) / kLoraRanksPerCta; ++jg) {
      for (int sp = 0; sp < ksplit; ++sp) {
        float sum[MT][kLoraRanksPerCta] = {};
        for (int t = 0; t < kLoraThreads; ++t) {
          float acc[MT][kLoraRanksPerCta] = {};
          lora_down_thread<MT, D>(d, jg, sp, t, key, acc);
          for (int m = 0; m < MT; ++m)
            for (int jj = 0; jj < kLoraRanksPerCta; ++jj) sum[m][jj] += acc[m][jj];
        }
        for (int m = 0; m < a.m; ++m)
          for (int jj = 0; jj < kLoraRanksPerCta; ++jj) {
            const int j = jg * kLoraRanksPerCta + jj;
            if (j < a.r) partial[(static_cast<size_t>(sp) * a.m + m) * a.r + j] = sum[m][jj];
          }
      }
    }
  }
  std::vector<float> code(16), xa(static_cast<size_t>(a.m) * a.r);
  std::vector<T> xa_out(xa.size());
  for (int i = 0; i < 16; ++i) code[i] = nf4_code(static_cast<uint32_t>(i));
  for (int i = 0; i < a.m * a.r; ++i) {
    xa[i] = lora_xa<D>(partial.data(), ksplit, a.m, a.r, i / a.r, i % a.r);
    xa_out[i] = Elem<D>::store(xa[i]);
  }
  // The staged copy of x, poisoned first so that a piece the copy misses shows up as NaN.
  std::vector<T> xs;
  if (shared_x) {
    const int64_t bytes = gemv_x_shared_bytes(a.m, a.k, static_cast<int>(sizeof(T)));
    std::vector<uint8_t> poison(static_cast<size_t>(bytes), 0xFF);
    xs.resize(static_cast<size_t>(bytes) / sizeof(T));
    std::memcpy(xs.data(), poison.data(), poison.size());
    for (int t = 0; t < kGemvThreads; ++t) gemv_stage_x<D>(a, t, xs.data());
  }
  T* y = static_cast<T*>(a.y);
  for (int64_t n = 0; n < a.n; ++n) {
    float total[MT] = {};
    for (int lane = 0; lane < 32; ++lane) {
      float acc[MT];
      if (shared_x) {
        gemv_row_lane<MT, D, true, true>(a, n, lane, code.data(), xa.data(), acc, xs.data());
      } else if (a.vec) {
        gemv_row_lane<MT, D, true>(a, n, lane, code.data(), xa.data(), acc);
      } else {
        gemv_row_lane<MT, D, false>(a, n, lane, code.data(), xa.data(), acc);
      }
      for (int m = 0; m < MT; ++m) total[m] += acc[m];
    }
    for (int m = 0; m < a.m; ++m) y[m * a.n + n] = Elem<D>::store(total[m]);
  }
  write_file("y.bin", y, static_cast<size_t>(a.m * a.n));
  write_file("xa.bin", xa_out.data(), xa_out.size());
}

template <DType D>
void gemv_dispatch(const GemvArgs& a, const std::vector<uint8_t>& lora_a, float p, int64_t seed, bool shared_x) {
  switch (gemv_rows_tile(a.m)) {
    case 1: return run_gemv<1, D>(a, lora_a, p, seed, shared_x);
    case 2: return run_gemv<2, D>(a, lora_a, p, seed, shared_x);
    case 4: return run_gemv<4, D>(a, lora_a, p, seed, shared_x);
    default: return run_gemv<16, D>(a, lora_a, p, seed, shared_x);
  }
}

int run(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: nf4_host COMMAND DIR [ARGS...] (see the source)\n");
    return 2;
  }
  const std::string cmd = argv[1];
  g_dir = argv[2];
  if (cmd == "codes") {
    uint32_t bits[16];
    for (uint32_t i = 0; i < 16; ++i) bits[i] = float_to_bits(nf4_code(i));
    write_file("codes.u32", bits, 16);
  } else if (cmd == "nibbles") {
    const std::vector<uint8_t> packed = read_file<uint8_t>("packed.u8");
    std::vector<uint8_t> nib(2 * packed.size()), word_nib(nib.size());
    for (size_t i = 0; i < nib.size(); ++i) nib[i] = static_cast<uint8_t>(nf4_nibble(packed.data(), static_cast<int64_t>(i)));
    for (size_t wd = 0; wd < packed.size() / 4; ++wd) {
      uint32_t word;
      std::memcpy(&word, packed.data() + 4 * wd, 4);
      for (int j = 0; j < 8; ++j) word_nib[8 * wd + j] = static_cast<uint8_t>(word_nibble(word, j));
    }
    write_file("nib.u8", nib.data(), nib.size());
    write_file("word_nib.u8", word_nib.data(), word_nib.size());
  } else if (cmd == "absmax") {
    const int64_t nblocks = arg_i(argv, 3);
    const Weight w(nblocks * 64, 64, true, 0);
    std::vector<float> out(static_cast<size_t>(nblocks));
    for (int64_t b = 0; b < nblocks; ++b) out[b] = nf4_absmax(w.view, b);
    write_file("absmax.f32", out.data(), out.size());
  } else if (cmd == "mix32") {
    std::vector<uint32_t> v = read_file<uint32_t>("in.u32");
    for (auto& x : v) x = mix32(x);
    write_file("out.u32", v.data(), v.size());
  } else if (cmd == "dropout") {
    const uint32_t key = mix32(static_cast<uint32_t>(arg_i(argv, 3)));
    const uint32_t threshold = dropout_threshold(std::strtod(argv[4], nullptr));
    const int64_t rows = arg_i(argv, 5), cols = arg_i(argv, 6);
    std::vector<uint8_t> keep(static_cast<size_t>(rows * cols));
    for (int64_t i = 0; i < rows * cols; ++i) keep[i] = dropout_keep(key, i, threshold) ? 1 : 0;
    write_file("keep.u8", keep.data(), keep.size());
  } else if (cmd == "convert") {
    const std::vector<float> in = read_file<float>("in.f32");
    std::vector<uint16_t> bf(in.size()), hf(in.size());
    for (size_t i = 0; i < in.size(); ++i) {
      bf[i] = float_to_bf16_bits(in[i]);
      hf[i] = float_to_half_bits(in[i]);
    }
    write_file("bf16.u16", bf.data(), bf.size());
    write_file("f16.u16", hf.data(), hf.size());
    const std::vector<uint16_t> h = read_file<uint16_t>("h.u16");
    std::vector<float> h2f(h.size());
    for (size_t i = 0; i < h.size(); ++i) h2f[i] = half_bits_to_float(h[i]);
    write_file("h2f.f32", h2f.data(), h2f.size());
  } else if (cmd == "dequant") {
    const int64_t numel = arg_i(argv, 3), blocksize = arg_i(argv, 4);
    const bool dq = arg_i(argv, 5) != 0;
    const int dtype = static_cast<int>(arg_i(argv, 6)), shift_in = static_cast<int>(arg_i(argv, 7));
    const int shift_out = static_cast<int>(arg_i(argv, 8));
    const Weight w(numel, blocksize, dq, shift_in);
    const bool vec_in = shift_in == 0;
    if (dtype == 0) run_dequant<DType::kFloat32>(w, vec_in, shift_out);
    else if (dtype == 1) run_dequant<DType::kFloat16>(w, vec_in, shift_out);
    else run_dequant<DType::kBFloat16>(w, vec_in, shift_out);
  } else if (cmd == "gemv") {
    const int64_t m = arg_i(argv, 3), n = arg_i(argv, 4), k = arg_i(argv, 5), r = arg_i(argv, 6);
    const int64_t blocksize = arg_i(argv, 7);
    const bool dq = arg_i(argv, 8) != 0;
    const int dtype = static_cast<int>(arg_i(argv, 9));
    const bool has_bias = arg_i(argv, 10) != 0;
    const float scaling = std::strtof(argv[11], nullptr), p = std::strtof(argv[12], nullptr);
    const int64_t seed = arg_i(argv, 13);
    const int64_t vec_mode = arg_i(argv, 14);  // 0 nibble path, 1 16-byte loads, 2 the same with x staged
    const bool vec = vec_mode != 0, shared_x = vec_mode == 2;
    const Weight w(n * k, blocksize, dq, 0);
    const std::vector<uint8_t> x = read_file<uint8_t>("x.bin");
    const std::vector<uint8_t> bias = has_bias ? read_file<uint8_t>("bias.bin") : std::vector<uint8_t>();
    const std::vector<uint8_t> lora_a = r > 0 ? read_file<uint8_t>("lora_a.bin") : std::vector<uint8_t>();
    const std::vector<uint8_t> lora_b = r > 0 ? read_file<uint8_t>("lora_b.bin") : std::vector<uint8_t>();
    const size_t esize = dtype == 0 ? 4 : 2;
    std::vector<uint8_t> y(static_cast<size_t>(m * n) * esize, 0xFF);
    GemvArgs a{};
    a.w = w.view;
    a.x = x.data();
    a.bias = has_bias ? bias.data() : nullptr;
    a.lora_b = r > 0 ? lora_b.data() : nullptr;
    a.y = y.data();
    a.n = n;
    a.k = k;
    a.m = static_cast<int>(m);
    a.r = static_cast<int>(r);
    a.scaling = scaling;
    a.vec = vec;
    if (vec && k % kNf4BlockAlign != 0) throw std::runtime_error("VEC=1 needs K % 64 == 0");
    if (dtype == 0) gemv_dispatch<DType::kFloat32>(a, lora_a, p, seed, shared_x);
    else if (dtype == 1) gemv_dispatch<DType::kFloat16>(a, lora_a, p, seed, shared_x);
    else gemv_dispatch<DType::kBFloat16>(a, lora_a, p, seed, shared_x);
  } else {
    std::fprintf(stderr, "unknown command %s\n", cmd.c_str());
    return 2;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "nf4_host: %s\n", e.what());
    return 1;
  }
}
