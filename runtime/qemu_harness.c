// Runs a Kiln artifact's native entry with no Python and no TVM runtime, e.g. an aarch64 artifact under
// qemu-user on an x86 machine. runtime/qemu.py builds this file with the target's cross gcc and drives it:
//
//   harness meta LIB OUT              write the artifact's metadata blob (JSON) to OUT
//   harness run LIB ENTRY PLAN DIR    lay out the values as PLAN says, read DIR/input<k>.bin, call ENTRY once,
//                                     write DIR/output<k>.bin; prints "run_ms <ms>" (emulated: not a speed)
//
// The kernels expect libtvm_runtime and libtvm_ffi, which do not exist for the target here. This file stands
// in for the few symbols they use: the error and bytes functions they link against (exported with -rdynamic),
// and the backend function-pointer slots the library holds (filled in after dlopen, as TVM's loader does).
// Parallel loops run on the artifact's own pool (codegen/pool.py) with KILN_HARNESS_THREADS threads (default 2),
// or serially, as one task, in a library without one.
#include <dlfcn.h>
#include <dlpack/dlpack.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <tvm/ffi/c_api.h>

enum { ALIGN = 64 };  // what the kernels assume of every buffer (runtime/artifact.py ALIGN)

static char raised[4096];  // the last error a kernel raised

void TVMFFIErrorSetRaisedFromCStrParts(const char* kind, const char** parts, int32_t n) {
  size_t at = (size_t)snprintf(raised, sizeof raised, "%s: ", kind);
  for (int32_t i = 0; i < n && at < sizeof raised; ++i)
    at += (size_t)snprintf(raised + at, sizeof raised - at, "%s", parts[i] ? parts[i] : "");
}

void TVMFFIErrorSetRaisedFromCStr(const char* kind, const char* message) {
  TVMFFIErrorSetRaisedFromCStrParts(kind, &message, 1);
}

// The pool moves an error raised on a worker to the caller's thread; here the message is in `raised` already.
void TVMFFIErrorMoveFromRaised(TVMFFIObjectHandle* result) { *result = NULL; }
void TVMFFIErrorSetRaised(TVMFFIObjectHandle error) { (void)error; }
int TVMFFIObjectDecRef(TVMFFIObjectHandle obj) {
  (void)obj;
  return 0;
}

// The blob functions return bytes through this; keep a view of the blob (it lives as long as the library).
static const char* blob_data;
static size_t blob_size;

int TVMFFIBytesFromByteArray(const TVMFFIByteArray* input, TVMFFIAny* out) {
  blob_data = input->data;
  blob_size = input->size;
  out->type_index = kTVMFFINone;
  return 0;
}

typedef struct {
  void* sync_handle;
  int32_t num_task;
} TVMParallelGroupEnv;
typedef int (*FTVMParallelLambda)(int task_id, TVMParallelGroupEnv* penv, void* cdata);

static int parallel_launch(FTVMParallelLambda flambda, void* cdata, int num_task) {
  (void)num_task;  // 0 means "all threads"; here that is one
  TVMParallelGroupEnv env = {NULL, 1};
  return flambda(0, &env, cdata);
}

static int parallel_barrier(int task_id, TVMParallelGroupEnv* penv) {
  (void)task_id, (void)penv;
  return 0;
}

static void* alloc_workspace(int device_type, int device_id, uint64_t nbytes, int code_hint, int bits_hint) {
  (void)device_type, (void)device_id, (void)code_hint, (void)bits_hint;
  return aligned_alloc(ALIGN, (nbytes + ALIGN - 1) / ALIGN * ALIGN + ALIGN);
}

static int free_workspace(int device_type, int device_id, void* ptr) {
  (void)device_type, (void)device_id;
  free(ptr);
  return 0;
}

static int die(const char* what, const char* detail) {
  fprintf(stderr, "kiln-harness: %s%s%s\n", what, detail ? ": " : "", detail ? detail : "");
  return 2;
}

static void* must_alloc(size_t nbytes) {
  void* p = aligned_alloc(ALIGN, (nbytes + ALIGN - 1) / ALIGN * ALIGN + ALIGN);
  if (!p) {
    fprintf(stderr, "kiln-harness: out of memory (%zu bytes)\n", nbytes);
    exit(2);
  }
  return memset(p, 0, nbytes);
}

static void* open_library(const char* path) {
  void* lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    fprintf(stderr, "kiln-harness: dlopen failed: %s\n", dlerror());
    return NULL;
  }
  // Slots TVM's loader fills that need the real runtime (packed calls into the environment, device blobs).
  static const char* unsupported[] = {"__TVMFFIEnvModLookupFromImports", "__TVMFFIFunctionCall",
                                      "__TVMFFIHandleInitOnce", "__tvm_ffi__library_bin"};
  for (size_t i = 0; i < sizeof unsupported / sizeof *unsupported; ++i)
    if (dlsym(lib, unsupported[i])) {
      fprintf(stderr, "kiln-harness: the library uses %s, which needs TVM's runtime\n", unsupported[i]);
      return NULL;
    }
  struct { const char* name; void* fn; } slots[] = {
      {"__TVMBackendParallelLaunch", (void*)parallel_launch},
      {"__TVMBackendParallelBarrier", (void*)parallel_barrier},
      {"__TVMBackendAllocWorkspace", (void*)alloc_workspace},
      {"__TVMBackendFreeWorkspace", (void*)free_workspace},
  };
  for (size_t i = 0; i < sizeof slots / sizeof *slots; ++i) {
    void** slot = (void**)dlsym(lib, slots[i].name);
    if (slot) *slot = slots[i].fn;
  }
  TVMFFISafeCallType pool = (TVMFFISafeCallType)dlsym(lib, "__tvm_ffi_kiln_pool");
  if (pool) {
    const char* env = getenv("KILN_HARNESS_THREADS");
    TVMFFIAny threads = {.type_index = kTVMFFIInt, .v_int64 = env ? atoi(env) : 2}, ret = {0};
    if (pool(NULL, &threads, 1, &ret) != 0) {
      fprintf(stderr, "kiln-harness: installing the thread pool failed: %s\n", raised);
      return NULL;
    }
  }
  return lib;
}

static int get_blob(void* lib, const char* name) {
  char symbol[256];
  snprintf(symbol, sizeof symbol, "__tvm_ffi_%s", name);
  TVMFFISafeCallType fn = (TVMFFISafeCallType)dlsym(lib, symbol);
  if (!fn) return die("the library has no blob function", symbol);
  TVMFFIAny ret = {0};
  blob_data = NULL;
  if (fn(NULL, NULL, 0, &ret) != 0 || !blob_data) return die("blob function failed", symbol);
  return 0;
}

static uint32_t crc32(const unsigned char* p, size_t n) {  // zlib's CRC-32, as runtime/model.py checks it
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; ++i) {
    c ^= p[i];
    for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
  }
  return ~c;
}

static int read_file(const char* path, void* dst, size_t nbytes) {
  FILE* f = fopen(path, "rb");
  if (!f) return die("cannot open input", path);
  size_t got = fread(dst, 1, nbytes, f);
  int extra = fgetc(f) != EOF;
  fclose(f);
  if (got != nbytes || extra) return die("input file has the wrong size", path);
  return 0;
}

static int write_file(const char* path, const void* src, size_t nbytes) {
  FILE* f = fopen(path, "wb");
  if (!f || fwrite(src, 1, nbytes, f) != nbytes) return die("cannot write", path);
  return fclose(f) == 0 ? 0 : die("cannot write", path);
}

static int cmd_meta(const char* lib_path, const char* out) {
  void* lib = open_library(lib_path);
  if (!lib) return 2;
  int rc = get_blob(lib, "kiln_meta");
  return rc ? rc : write_file(out, blob_data, blob_size);
}

// PLAN (written by runtime/qemu.py from the metadata, one value per line as runtime/model.py lays them out):
//   kiln-qemu-plan 1
//   weights NBYTES CRC32
//   blocks N NBYTES...
//   inputs N NBYTES...
//   outputs N NBYTES...
//   values N
//   KIND ARG CODE BITS NDIM DIMS...       KIND: i (ARG input index), o (output), c (weights offset), b (block)
//                                         a b line ends with the value's byte offset in its block
static int cmd_run(const char* lib_path, const char* entry, const char* plan_path, const char* dir) {
  FILE* plan = fopen(plan_path, "r");
  if (!plan) return die("cannot open plan", plan_path);
  int version = 0;
  unsigned long long weights_nbytes = 0, weights_crc = 0;
  if (fscanf(plan, "kiln-qemu-plan %d weights %llu %llu", &version, &weights_nbytes, &weights_crc) != 3 ||
      version != 1)
    return die("bad plan header", plan_path);
  char** groups[3];  // the buffers of the blocks, inputs and outputs
  size_t* group_sizes[3];
  int group_counts[3];
  const char* group_names[3] = {"blocks", "inputs", "outputs"};
  for (int g = 0; g < 3; ++g) {
    char word[16];
    if (fscanf(plan, "%15s %d", word, &group_counts[g]) != 2 || strcmp(word, group_names[g]) != 0)
      return die("bad plan line", group_names[g]);
    groups[g] = calloc((size_t)group_counts[g] + 1, sizeof(char*));
    group_sizes[g] = calloc((size_t)group_counts[g] + 1, sizeof(size_t));
    for (int k = 0; k < group_counts[g]; ++k) {
      unsigned long long n;
      if (fscanf(plan, "%llu", &n) != 1) return die("bad plan sizes", group_names[g]);
      group_sizes[g][k] = (size_t)n;
      groups[g][k] = must_alloc((size_t)n);
    }
  }
  char **blocks = groups[0], **inputs = groups[1], **outputs = groups[2];

  void* lib = open_library(lib_path);
  if (!lib) return 2;
  char* weights = must_alloc((size_t)weights_nbytes);
  if (weights_nbytes) {  // copied into an aligned arena once, as runtime/model.py does
    int rc = get_blob(lib, "kiln_weights");
    if (rc) return rc;
    if (blob_size != weights_nbytes) return die("weights blob size differs from the metadata", NULL);
    if (crc32((const unsigned char*)blob_data, blob_size) != (uint32_t)weights_crc)
      return die("weights are corrupted (checksum mismatch)", NULL);
    memcpy(weights, blob_data, blob_size);
  }

  int n_values;
  if (fscanf(plan, " values %d", &n_values) != 1) return die("bad plan line", "values");
  DLTensor* table = must_alloc(sizeof(DLTensor) * (size_t)n_values);
  for (int i = 0; i < n_values; ++i) {
    char kind;
    unsigned long long arg;
    int code, bits, ndim;
    if (fscanf(plan, " %c %llu %d %d %d", &kind, &arg, &code, &bits, &ndim) != 5) return die("bad value", NULL);
    int64_t* shape = must_alloc(sizeof(int64_t) * (size_t)(ndim > 0 ? ndim : 1));
    for (int d = 0; d < ndim; ++d) {
      long long dim;
      if (fscanf(plan, "%lld", &dim) != 1) return die("bad shape", NULL);
      shape[d] = dim;
    }
    char* data;
    switch (kind) {
      case 'i': data = inputs[arg]; break;
      case 'o': data = outputs[arg]; break;
      case 'c': data = weights + arg; break;
      case 'b': {
        unsigned long long offset;
        if (fscanf(plan, "%llu", &offset) != 1) return die("bad block offset", NULL);
        data = blocks[arg] + offset;
        break;
      }
      default: return die("unknown value kind in plan", NULL);
    }
    table[i] = (DLTensor){data, {kDLCPU, 0}, ndim, {(uint8_t)code, (uint8_t)bits, 1}, shape, NULL, 0};
  }
  fclose(plan);

  char path[4096];
  for (int k = 0; k < group_counts[1]; ++k) {
    snprintf(path, sizeof path, "%s/input%d.bin", dir, k);
    if (read_file(path, inputs[k], group_sizes[1][k])) return 2;
  }
  char symbol[256];
  snprintf(symbol, sizeof symbol, "__tvm_ffi_%s", entry);
  TVMFFISafeCallType run = (TVMFFISafeCallType)dlsym(lib, symbol);
  if (!run) return die("the library has no entry function", symbol);
  int64_t table_shape[1] = {(int64_t)(sizeof(DLTensor) * (size_t)n_values)};
  DLTensor table_tensor = {table, {kDLCPU, 0}, 1, {kDLUInt, 8, 1}, table_shape, NULL, 0};
  TVMFFIAny args[1] = {{.type_index = kTVMFFIDLTensorPtr, .v_ptr = &table_tensor}};
  TVMFFIAny ret = {0};
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  int rc = run(NULL, args, 1, &ret);
  clock_gettime(CLOCK_MONOTONIC, &t1);
  if (rc != 0) {
    fprintf(stderr, "kiln-harness: %s returned %d: %s\n", entry, rc, raised[0] ? raised : "(no message)");
    return 1;
  }
  for (int k = 0; k < group_counts[2]; ++k) {
    snprintf(path, sizeof path, "%s/output%d.bin", dir, k);
    if (write_file(path, outputs[k], group_sizes[2][k])) return 2;
  }
  printf("run_ms %.3f\n", (double)(t1.tv_sec - t0.tv_sec) * 1e3 + (double)(t1.tv_nsec - t0.tv_nsec) / 1e6);
  return 0;
}

int main(int argc, char** argv) {
  if (argc == 4 && strcmp(argv[1], "meta") == 0) return cmd_meta(argv[2], argv[3]);
  if (argc == 6 && strcmp(argv[1], "run") == 0) return cmd_run(argv[2], argv[3], argv[4], argv[5]);
  fprintf(stderr, "usage: %s meta LIB OUT | run LIB ENTRY PLAN DIR\n", argv[0]);
  return 2;
}
