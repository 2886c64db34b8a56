// TEST-ONLY: what nvcc gives a .cu file (__global__, threadIdx, warp shuffles, atomics) and a
// kernel launch (MSDA_LAUNCH, which ms_deform_attn_cuda_kernels.cu otherwise defines as <<<...>>>),
// emulated on the host so that the real kernel source compiles as C++ and runs on CPU memory.
// Included first by ms_deform_attn_cuda_kernels_emulated.cpp; not used by any real build.
//
// Every block runs as kMsdaBlockThreads host threads. __shfl_xor_sync is a block-wide barrier
// exchange, so it also checks that all threads execute the same number of shuffles (CUDA requires
// every lane named in the mask to take part; a kernel breaking that fails here instead of hanging).
// atomicAdd is std::atomic_ref::fetch_add. Speed is irrelevant: use tiny problems.
#pragma once

#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

namespace msda_emulation {

struct Index {
  unsigned int x = 0, y = 0, z = 0;
};

// What the threads of the block being run share: the barrier of each shuffle and one slot per thread.
struct Block {
  std::barrier<>* barrier;
  std::uint64_t* slots;
};

inline thread_local Index thread_index;
inline thread_local Index block_index;
inline thread_local Block* current_block = nullptr;
inline thread_local std::int64_t shuffles = 0;

// Runs `body` (the kernel call) as `threads` host threads per block, one block after the other.
template <typename Body>
void launch(unsigned int blocks, int threads, Body&& body) {
  for (unsigned int b = 0; b < blocks; ++b) {
    std::barrier<> barrier(threads);
    std::vector<std::uint64_t> slots(threads);
    std::vector<std::int64_t> counts(threads, 0);
    Block block{&barrier, slots.data()};
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        thread_index.x = static_cast<unsigned int>(t);
        block_index.x = b;
        current_block = &block;
        shuffles = 0;
        body();
        counts[t] = shuffles;
        // Threads that are done stop counting towards the barrier, so a mismatch ends instead of hanging.
        barrier.arrive_and_drop();
      });
    }
    for (auto& thread : pool) thread.join();
    for (int t = 1; t < threads; ++t) {
      if (counts[t] != counts[0]) {
        throw std::runtime_error("cuda emulation: threads of block " + std::to_string(b) +
                                 " executed different numbers of warp shuffles (" + std::to_string(counts[0]) +
                                 " vs " + std::to_string(counts[t]) + " in thread " + std::to_string(t) + ")");
      }
    }
  }
}

}  // namespace msda_emulation

#define threadIdx (::msda_emulation::thread_index)
#define blockIdx (::msda_emulation::block_index)

// Expanded inside the kernels file, where kBlockThreads is the block size; the stream is ignored.
#define MSDA_LAUNCH(kernel, blocks, stream, ...) \
  ::msda_emulation::launch(blocks, kBlockThreads, [&] { kernel(__VA_ARGS__); })

template <typename T>
T __shfl_xor_sync(unsigned int /*mask*/, T value, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= sizeof(std::uint64_t), "shuffled type too large");
  using namespace msda_emulation;
  Block& block = *current_block;
  const int t = static_cast<int>(thread_index.x);
  std::uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  block.slots[t] = bits;
  ++shuffles;
  block.barrier->arrive_and_wait();
  const int lane = t % 32;
  const int segment = lane - lane % width;
  int source = lane ^ lane_mask;
  if (source < segment || source >= segment + width) source = lane;
  const std::uint64_t received = block.slots[t - lane + source];
  block.barrier->arrive_and_wait();  // nobody overwrites a slot before every thread has read its own
  T out;
  std::memcpy(&out, &received, sizeof(T));
  return out;
}

template <typename T>
T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}
