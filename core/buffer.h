// Memory that belongs to a backend: host memory for the CPU backend, device memory for CUDA.
// Layers and sessions hold their working arrays in these, so the same layer code drives every
// backend.
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>

namespace moert {

// What a Buffer needs of its backend.
class Allocator {
 public:
  virtual ~Allocator() = default;
  virtual void* allocate(size_t bytes) = 0;  // throws Error(OutOfMemory) on failure
  // Releases what allocate(bytes) returned, told the same `bytes`.
  virtual void deallocate(void* p, size_t bytes) noexcept = 0;
};

// An owning, move-only array of T in an allocator's memory. Resizing keeps no contents.
template <typename T>
class Buffer {
 public:
  Buffer() = default;
  Buffer(Allocator& a, size_t n) { resize(a, n); }
  ~Buffer() { release(); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  Buffer(Buffer&& o) noexcept { swap(o); }
  Buffer& operator=(Buffer&& o) noexcept {
    if (this != &o) {
      release();
      swap(o);
    }
    return *this;
  }

  // Makes room for n elements; the contents are unspecified afterwards.
  void resize(Allocator& a, size_t n) {
    if (n <= capacity_ && alloc_ == &a) {
      size_ = n;
      return;
    }
    release();
    if (n > 0) {
      data_ = static_cast<T*>(a.allocate(n * sizeof(T)));
      alloc_ = &a;
    }
    size_ = capacity_ = n;
  }

  T* data() { return data_; }
  const T* data() const { return data_; }
  size_t size() const { return size_; }
  size_t bytes() const { return size_ * sizeof(T); }
  // What it holds, which a smaller resize keeps.
  size_t capacity_bytes() const { return capacity_ * sizeof(T); }
  // Gives the memory back.
  void clear() { release(); }

 private:
  void release() {
    if (data_ && alloc_) alloc_->deallocate(data_, capacity_ * sizeof(T));
    data_ = nullptr;
    alloc_ = nullptr;
    size_ = capacity_ = 0;
  }
  void swap(Buffer& o) noexcept {
    std::swap(data_, o.data_);
    std::swap(size_, o.size_);
    std::swap(capacity_, o.capacity_);
    std::swap(alloc_, o.alloc_);
  }

  T* data_ = nullptr;
  size_t size_ = 0, capacity_ = 0;
  Allocator* alloc_ = nullptr;
};

// The bytes a set of buffers holds, and their release: for the working buffers that passes size
// (Layer::release_work).
template <typename... B>
size_t held_bytes(const B&... buffers) {
  return (size_t{0} + ... + buffers.capacity_bytes());
}
template <typename... B>
void clear_buffers(B&... buffers) {
  (buffers.clear(), ...);
}

}  // namespace moert
