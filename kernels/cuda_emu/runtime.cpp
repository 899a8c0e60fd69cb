// The CPU emulation's scheduler: fibers for CUDA threads, barriers, the grid loop, and the small
// part of the CUDA runtime API the launchers call (see runtime.h for what is and is not modelled).
#include "runtime.h"

#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace fastattr_emu {

thread_local ThreadCtx* t_ctx = nullptr;

// Named (not anonymous) so that the assembly entry point can take a Fiber.
namespace detail {

// Kernel frames are small; the emulated mma keeps a warp's fragments (1.3 KB) on the stack.
constexpr std::size_t kStackBytes = 128 * 1024;

struct Fiber {
  ThreadCtx ctx;
  enum State : unsigned char { kReady, kAtBlockBarrier, kAtWarpBarrier, kDone } state = kReady;
  void* sp = nullptr;
  char* mapping = nullptr;  // a guard page, then the stack
#if !defined(__x86_64__)
  ucontext_t uc;
#endif
};

struct Warp {
  int live = 0, arrived = 0;
  unsigned live_mask = 0;
  alignas(16) unsigned char scratch[kWarpSize * kLaneScratch];
};

// One OS thread's block in flight, and the fibers it reuses from block to block.
// Dynamic shared memory, aligned as a GPU's (kernels cast it to float4 and wider).
struct alignas(128) SharedChunk {
  unsigned char bytes[128];
};

struct BlockRun {
  std::vector<std::unique_ptr<Fiber>> fibers;
  std::vector<Warp> warps;
  std::vector<int> order;
  std::vector<SharedChunk> dynamic_shared;
  std::size_t dynamic_bytes = 0;
  std::uint64_t serial = 0;
  const Body* body = nullptr;
  int n = 0, live = 0, arrived = 0;
  bool reshuffle = false;
  std::uint64_t rng = 0;
  std::string error;
  void* scheduler_sp = nullptr;
#if !defined(__x86_64__)
  ucontext_t scheduler_uc;
#endif

  ~BlockRun() {
    for (auto& f : fibers) munmap(f->mapping, kStackBytes + page());
  }
  static std::size_t page() { return static_cast<std::size_t>(sysconf(_SC_PAGESIZE)); }
};

thread_local BlockRun* t_run = nullptr;
thread_local Fiber* t_fiber = nullptr;

}  // namespace detail
}  // namespace fastattr_emu

// ------------------------------------------------------------------------------------------------
// Switching stacks. x86-64: save the callee-saved registers and the FP control words on the old
// stack, swap stack pointers, restore from the new one; a new fiber's stack is laid out as if it
// had switched away just before its first instruction (fastattr_emu_start, which calls
// fastattr_emu_fiber_main with the fiber held in r12). Elsewhere: ucontext.
// ------------------------------------------------------------------------------------------------
extern "C" __attribute__((visibility("hidden"))) void fastattr_emu_fiber_main(fastattr_emu::detail::Fiber* f);

#if defined(__x86_64__)
extern "C" void fastattr_emu_switch(void** save_sp, void* load_sp);
extern "C" void fastattr_emu_start();
asm(R"(
  .text
  .p2align 4
  .globl fastattr_emu_switch
  .hidden fastattr_emu_switch
  .type fastattr_emu_switch, @function
fastattr_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr 8(%rsp)
  fnstcw (%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr 8(%rsp)
  fldcw (%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size fastattr_emu_switch, .-fastattr_emu_switch

  .p2align 4
  .globl fastattr_emu_start
  .hidden fastattr_emu_start
  .type fastattr_emu_start, @function
fastattr_emu_start:
  movq %r12, %rdi
  call fastattr_emu_fiber_main
  ud2
  .size fastattr_emu_start, .-fastattr_emu_start
)");
#endif

namespace fastattr_emu {
namespace detail {

void prepare_stack(Fiber& f) {
  char* top = f.mapping + BlockRun::page() + kStackBytes;
#if defined(__x86_64__)
  // From the saved stack pointer up: x87 control word, MXCSR (16 bytes), r15, r14, r13, r12, rbx,
  // rbp, return address. At fastattr_emu_start the stack is 16-byte aligned, as before a call.
  auto* sp = reinterpret_cast<std::uint64_t*>(top - 88);
  std::uint32_t mxcsr = 0;
  std::uint16_t fpucw = 0;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  sp[0] = fpucw;
  sp[1] = mxcsr;
  sp[2] = sp[3] = sp[4] = 0;                        // r15, r14, r13
  sp[5] = reinterpret_cast<std::uint64_t>(&f);      // r12: the fiber
  sp[6] = sp[7] = 0;                                // rbx, rbp
  sp[8] = reinterpret_cast<std::uint64_t>(&fastattr_emu_start);
  f.sp = sp;
#else
  getcontext(&f.uc);
  f.uc.uc_stack.ss_sp = f.mapping + BlockRun::page();
  f.uc.uc_stack.ss_size = kStackBytes;
  f.uc.uc_link = nullptr;
  makecontext(&f.uc, reinterpret_cast<void (*)()>(&fastattr_emu_fiber_main), 1, &f);
  (void)top;
#endif
}

void resume(BlockRun& r, Fiber& f) {
  t_fiber = &f;
  t_ctx = &f.ctx;
#if defined(__x86_64__)
  fastattr_emu_switch(&r.scheduler_sp, f.sp);
#else
  swapcontext(&r.scheduler_uc, &f.uc);
#endif
  t_fiber = nullptr;
  t_ctx = nullptr;
}

void yield() {
  BlockRun& r = *t_run;
  Fiber& f = *t_fiber;
#if defined(__x86_64__)
  fastattr_emu_switch(&f.sp, r.scheduler_sp);
#else
  swapcontext(&f.uc, &r.scheduler_uc);
#endif
}

std::uint64_t next_random(std::uint64_t& s) {
  s ^= s << 13;
  s ^= s >> 7;
  s ^= s << 17;
  return s;
}

void release_block(BlockRun& r) {
  for (int i = 0; i < r.n; ++i)
    if (r.fibers[i]->state == Fiber::kAtBlockBarrier) r.fibers[i]->state = Fiber::kReady;
  r.arrived = 0;
  r.reshuffle = true;
}

void release_warp(BlockRun& r, unsigned w) {
  const int first = static_cast<int>(w) * kWarpSize;
  const int last = std::min(r.n, first + kWarpSize);
  for (int i = first; i < last; ++i)
    if (r.fibers[i]->state == Fiber::kAtWarpBarrier) r.fibers[i]->state = Fiber::kReady;
  r.warps[w].arrived = 0;
}

void thread_exited(BlockRun& r, Fiber& f) {
  f.state = Fiber::kDone;
  --r.live;
  Warp& w = r.warps[f.ctx.warp];
  --w.live;
  w.live_mask &= ~(1u << f.ctx.lane);
  // An exited thread no longer holds a barrier back (sm_70 and newer count only running threads).
  if (r.arrived > 0 && r.arrived == r.live) release_block(r);
  if (w.arrived > 0 && w.arrived == w.live) release_warp(r, f.ctx.warp);
}

std::string where(const ThreadCtx& c) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "block (%u, %u, %u) thread (%u, %u, %u)", c.block_idx.x, c.block_idx.y,
                c.block_idx.z, c.thread_idx.x, c.thread_idx.y, c.thread_idx.z);
  return buf;
}

void run_block(BlockRun& r, const LaunchConfig& cfg, uint3 bid) {
  const dim3 b = cfg.block;
  r.n = static_cast<int>(b.x * b.y * b.z);
  while (static_cast<int>(r.fibers.size()) < r.n) {
    auto f = std::make_unique<Fiber>();
    void* m = mmap(nullptr, kStackBytes + BlockRun::page(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) throw std::runtime_error("cuda emulation: cannot map a fiber stack");
    f->mapping = static_cast<char*>(m);
    mprotect(f->mapping, BlockRun::page(), PROT_NONE);  // a stack overflow faults instead of corrupting
    r.fibers.push_back(std::move(f));
  }
  const int n_warps = (r.n + kWarpSize - 1) / kWarpSize;
  r.warps.assign(n_warps, Warp{});
  r.order.resize(r.n);
  for (int i = 0; i < r.n; ++i) {
    Fiber& f = *r.fibers[i];
    const unsigned x = i % b.x, y = (i / b.x) % b.y, z = i / (b.x * b.y);
    f.ctx = ThreadCtx{uint3{x, y, z}, bid, b, cfg.grid, static_cast<unsigned>(i % kWarpSize),
                      static_cast<unsigned>(i / kWarpSize)};
    f.state = Fiber::kReady;
    prepare_stack(f);
    Warp& w = r.warps[i / kWarpSize];
    ++w.live;
    w.live_mask |= 1u << (i % kWarpSize);
    r.order[i] = i;
  }
  r.live = r.n;
  r.arrived = 0;
  r.reshuffle = true;
  // Poisoned per block: a GPU's shared memory holds whatever the last block left, never zeros.
  if (!r.dynamic_shared.empty())
    std::memset(r.dynamic_shared.data(), kSharedPoison, r.dynamic_shared.size() * sizeof(SharedChunk));
  static std::atomic<std::uint64_t> serials{1};
  r.serial = serials.fetch_add(1);
  while (r.live > 0 && r.error.empty()) {
    if (r.reshuffle) {  // a new phase: run its threads in a fresh order
      for (int i = r.n - 1; i > 0; --i) std::swap(r.order[i], r.order[next_random(r.rng) % (i + 1)]);
      r.reshuffle = false;
    }
    bool ran = false;
    for (int k = 0; k < r.n && r.error.empty() && !r.reshuffle; ++k) {
      Fiber& f = *r.fibers[r.order[k]];
      if (f.state != Fiber::kReady) continue;
      resume(r, f);
      ran = true;
    }
    if (!ran && !r.reshuffle && r.live > 0 && r.error.empty()) {
      int at_block = 0, at_warp = 0;
      for (int i = 0; i < r.n; ++i) {
        at_block += r.fibers[i]->state == Fiber::kAtBlockBarrier;
        at_warp += r.fibers[i]->state == Fiber::kAtWarpBarrier;
      }
      r.error = "deadlock: " + std::to_string(at_block) + " threads wait at __syncthreads() and " +
                std::to_string(at_warp) + " at a warp collective, none can go on";
    }
  }
}

struct LastError {
  cudaError_t code = cudaSuccess;
  std::string message;
};
thread_local LastError t_error;

void set_error(cudaError_t code, std::string message) {
  t_error.code = code;
  t_error.message = std::move(message);
}

int worker_count() {
  if (const char* v = std::getenv("FASTATTR_EMU_THREADS")) {
    const int n = std::atoi(v);
    if (n >= 1) return n;
  }
  const unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(std::min(hw, 4u));
}

std::uint64_t seed() {
  static const std::uint64_t s = [] {
    const char* v = std::getenv("FASTATTR_EMU_SEED");
    const std::uint64_t x = v != nullptr ? std::strtoull(v, nullptr, 10) : 0x9e3779b97f4a7c15ULL;
    return x == 0 ? 1 : x;
  }();
  return s;
}

}  // namespace detail

using namespace detail;

[[noreturn]] void fail(const std::string& what) { throw std::runtime_error(what); }

void sync_block() {
  if (t_fiber == nullptr) fail("__syncthreads() outside a kernel");
  BlockRun& r = *t_run;
  t_fiber->state = Fiber::kAtBlockBarrier;
  if (++r.arrived == r.live) release_block(r);
  yield();
}

void sync_warp(unsigned mask) {
  if (t_fiber == nullptr) fail("a warp collective outside a kernel");
  BlockRun& r = *t_run;
  Warp& w = r.warps[t_ctx->warp];
  if ((mask & w.live_mask) != w.live_mask || (mask & (1u << t_ctx->lane)) == 0)
    fail("a warp collective over part of a warp (mask " + std::to_string(mask) + ", running lanes " +
         std::to_string(w.live_mask) + "): the emulation runs whole-warp collectives only");
  t_fiber->state = Fiber::kAtWarpBarrier;
  if (++w.arrived == w.live) release_warp(r, t_ctx->warp);
  yield();
}

unsigned char* warp_scratch() {
  if (t_fiber == nullptr) fail("a warp collective outside a kernel");
  return t_run->warps[t_ctx->warp].scratch;
}

unsigned char* dynamic_shared_base() {
  if (t_fiber == nullptr) fail("extern __shared__ memory outside a kernel");
  if (t_run->dynamic_bytes == 0) fail("extern __shared__ memory used by a launch that asked for none");
  return t_run->dynamic_shared.data()->bytes;
}

void poison_shared(void* p, std::size_t bytes) {
  if (t_fiber == nullptr) fail("__shared__ memory outside a kernel");
  // Which block last poisoned each static __shared__ variable of this OS thread's kernels.
  thread_local std::unordered_map<void*, std::uint64_t> poisoned_by;
  std::uint64_t& last = poisoned_by[p];
  if (last == t_run->serial) return;
  last = t_run->serial;
  std::memset(p, kSharedPoison, bytes);
}

unsigned warp_live_mask() {
  if (t_fiber == nullptr) fail("a warp collective outside a kernel");
  return t_run->warps[t_ctx->warp].live_mask;
}

std::uint64_t block_serial() {
  if (t_fiber == nullptr) fail("a block collective outside a kernel");
  return t_run->serial;
}

namespace {
std::mutex g_counts_mu;
std::map<std::string, long long> g_counts;
}  // namespace

std::vector<std::pair<std::string, long long>> launch_counts() {
  std::lock_guard<std::mutex> lock(g_counts_mu);
  return {g_counts.begin(), g_counts.end()};
}

void run_grid(const LaunchConfig& cfg, const Body& body) {
  {
    std::lock_guard<std::mutex> lock(g_counts_mu);
    ++g_counts[body.name];
  }
  const dim3 g = cfg.grid, b = cfg.block;
  const long long threads = static_cast<long long>(b.x) * b.y * b.z;
  if (g.x == 0 || g.y == 0 || g.z == 0 || g.x > 0x7fffffffu || g.y > 65535 || g.z > 65535 || threads == 0 ||
      threads > 1024 || b.x > 1024 || b.y > 1024 || b.z > 64) {
    set_error(cudaErrorInvalidConfiguration,
              "invalid configuration argument: grid (" + std::to_string(g.x) + ", " + std::to_string(g.y) + ", " +
                  std::to_string(g.z) + "), block (" + std::to_string(b.x) + ", " + std::to_string(b.y) + ", " +
                  std::to_string(b.z) + ")");
    return;
  }
  if (cfg.shared_bytes > kMaxDynamicShared) {
    set_error(cudaErrorInvalidValue, "invalid argument: " + std::to_string(cfg.shared_bytes) +
                                         " bytes of dynamic shared memory, more than the 48 KiB a launch gets");
    return;
  }
  const long long blocks = static_cast<long long>(g.x) * g.y * g.z;
  std::atomic<long long> next{0};
  std::atomic<bool> stop{false};
  std::mutex mu;
  std::string first_error;
  auto work = [&](int worker) {
    thread_local std::unique_ptr<BlockRun> mine;  // fibers and stacks kept for the next launch
    if (!mine) mine = std::make_unique<BlockRun>();
    BlockRun& r = *mine;
    BlockRun* outer = t_run;
    t_run = &r;
    r.body = &body;
    r.dynamic_shared.assign((cfg.shared_bytes + sizeof(SharedChunk) - 1) / sizeof(SharedChunk), SharedChunk{});
    r.dynamic_bytes = cfg.shared_bytes;
    r.rng = seed() + 0x632be59bd9b4e019ULL * static_cast<std::uint64_t>(worker + 1);
    for (long long i; !stop.load() && (i = next.fetch_add(1)) < blocks;) {
      const uint3 bid{static_cast<unsigned>(i % g.x), static_cast<unsigned>((i / g.x) % g.y),
                      static_cast<unsigned>(i / (static_cast<long long>(g.x) * g.y))};
      r.error.clear();
      run_block(r, cfg, bid);
      if (!r.error.empty()) {
        std::lock_guard<std::mutex> lock(mu);
        if (first_error.empty()) first_error = r.error;
        stop = true;
      }
    }
    t_run = outer;
  };
  const int workers = static_cast<int>(std::min<long long>(worker_count(), blocks));
  std::vector<std::thread> pool;
  for (int w = 1; w < workers; ++w) pool.emplace_back(work, w);
  work(0);
  for (auto& t : pool) t.join();
  if (!first_error.empty()) set_error(cudaErrorLaunchFailure, std::string("unspecified launch failure (emulated ") +
                                                                   body.name + "): " + first_error);
}

}  // namespace fastattr_emu

extern "C" void fastattr_emu_fiber_main(fastattr_emu::detail::Fiber* f) {
  using namespace fastattr_emu::detail;
  BlockRun& r = *t_run;
  try {
    r.body->call(r.body->state);
  } catch (const std::exception& e) {
    if (r.error.empty()) r.error = where(f->ctx) + ": " + e.what();
  } catch (...) {
    if (r.error.empty()) r.error = where(f->ctx) + ": an exception";
  }
  thread_exited(r, *f);
  yield();
  std::abort();  // a finished fiber is never resumed
}

// ------------------------------------------------------------------------------------------------
// The runtime API: one emulated device, host memory, every call synchronous.
// ------------------------------------------------------------------------------------------------
using fastattr_emu::detail::t_error;

cudaError_t cudaGetLastError() {
  const cudaError_t e = t_error.code;
  t_error.code = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return t_error.code; }
const char* cudaGetErrorString(cudaError_t err) {
  if (err == cudaSuccess) return "no error";
  if (!t_error.message.empty()) return t_error.message.c_str();
  return "emulated CUDA error";
}
cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidValue;
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = static_cast<int>(fastattr_emu::kMaxDynamicShared); return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = fastattr_emu::kMultiprocessors; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = fastattr_emu::kComputeCapability / 10; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = fastattr_emu::kComputeCapability % 10; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
cudaError_t cudaDriverGetVersion(int* version) {
  *version = CUDART_VERSION;
  return cudaSuccess;
}
cudaError_t cudaRuntimeGetVersion(int* version) {
  *version = CUDART_VERSION;
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* ptr, int value, std::size_t bytes, cudaStream_t) {
  if (bytes != 0 && ptr == nullptr) return cudaErrorInvalidValue;
  std::memset(ptr, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, std::size_t bytes, int, cudaStream_t) {
  if (bytes != 0 && (dst == nullptr || src == nullptr)) return cudaErrorInvalidValue;
  std::memmove(dst, src, bytes);
  return cudaSuccess;
}
