// The two C++ runtime symbols a TFLM program needs on bare-metal RISC-V, where Debian ships no libstdc++.
// TFLM never allocates from the heap; these are only referenced by the deleting destructors that the compiler
// emits for classes with virtual destructors, which static-memory TFLM never calls.
#include <cstddef>

void operator delete(void*) noexcept {}
void operator delete(void*, std::size_t) noexcept {}
extern "C" void __cxa_pure_virtual() {
  while (true) {
  }
}
