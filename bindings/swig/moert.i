/* SWIG interface: generates the low-level Go (cgo) and Java (JNI) layers from moert.h.
 *
 * Nothing here restates a declaration of the header: the header itself is %include'd at the end,
 * so every function and #define it has reaches both languages. What this file adds is the
 * mapping of the header's conventions, keyed on types and on the parameter names the header uses
 * for one convention, never on a particular function:
 *
 *   moert_x** out                    the new handle of a create/load call
 *   T* out (any scalar T)            one value out; NULL allowed where the header says so
 *   const char** out|name            a library-owned string out: copied into the language's string
 *   (const T* in, uint64_t in_len)   a caller-owned array in, with its length in elements
 *   (T* out, uint64_t out_len)       a caller-owned array out, with its length in elements
 *   (T* data, uint64_t len)          a caller-owned array read and overwritten in place
 *
 * The pointer+length pairs are matched by their names (SWIG matches multi-argument typemaps by
 * name); bindings/swig/check_generated.cmake fails the build's tests when the header grows a
 * parameter that falls through to SWIG's opaque-pointer default, so a new name is added here
 * before it ships.
 *
 * Both generated layers are internal: the idiomatic Go package and Java classes are the API.
 */
#if defined(SWIGJAVA)
%module(jniclassname = "CapiJNI") Capi
#else
%module capi
#endif

%{
#include <moert/moert.h>
#include <string.h>
%}

%include <stdint.i>

/* The header's export macro means nothing to SWIG. */
#define MOERT_API

/* Pointer + length pairs, by direction, as the header names them. */
#define MOERT_IN_ARRAYS(T)                                                            \
  (const T* in, uint64_t in_len), (const T* in, uint64_t len),                        \
      (const T* tokens, uint64_t num_tokens), (const T* targets, uint64_t num_targets), \
      (const T* grad_out, uint64_t grad_out_len), (const T* row_mask, uint64_t mask_len)
#define MOERT_OUT_ARRAYS(T)                                                       \
  (T* out, uint64_t out_len), (T* out, uint64_t len), (T* counts, uint64_t len),  \
      (T* grad_in, uint64_t grad_in_len), (T* stats, uint64_t stats_len),          \
      (T* counters, uint64_t len), (T* seconds, uint64_t len), (T* data, uint64_t len)

/* ============================================================================================ */
#if defined(SWIGGO)

/* Exact widths: SWIG's defaults give int32_t the Go type int, and int32_t* the type *int, whose
 * element is 8 bytes wide; the C side would write only half of it. */
%typemap(gotype) int32_t, const int32_t& "int32"
%typemap(gotype) uint32_t, const uint32_t& "uint32"

/* One scalar out: a Go pointer, nil for NULL. cgo lets C write through a Go pointer to memory
 * without Go pointers in it for the duration of the call. */
%define MOERT_GO_SCALAR_OUT(CTYPE, GOTYPE)
%typemap(gotype) CTYPE* "*GOTYPE"
%typemap(in) CTYPE* %{ $1 = ($1_ltype)$input; %}
%enddef
MOERT_GO_SCALAR_OUT(int32_t, int32)
MOERT_GO_SCALAR_OUT(uint32_t, uint32)
MOERT_GO_SCALAR_OUT(int64_t, int64)
MOERT_GO_SCALAR_OUT(uint64_t, uint64)
MOERT_GO_SCALAR_OUT(double, float64)

/* Arrays: Go slices, passed to C as SWIG's {array, len, cap} slice header; a nil slice is NULL
 * with length 0. The element memory holds no Go pointers, so cgo's rules allow it. */
%define MOERT_GO_ARRAYS(CTYPE, GOTYPE)
%typemap(gotype) MOERT_IN_ARRAYS(CTYPE), MOERT_OUT_ARRAYS(CTYPE) "[]GOTYPE"
%typemap(in) MOERT_IN_ARRAYS(CTYPE), MOERT_OUT_ARRAYS(CTYPE) %{
  $1 = ($1_ltype)$input.array;
  $2 = ($2_ltype)$input.len;
%}
%enddef
MOERT_GO_ARRAYS(float, float32)
MOERT_GO_ARRAYS(int32_t, int32)
MOERT_GO_ARRAYS(int64_t, int64)
MOERT_GO_ARRAYS(uint8_t, byte)
MOERT_GO_ARRAYS(double, float64)

/* The address of the host's MPI_Comm (moert_comm_create_mpi): a uintptr, 0 for NULL. It points
 * into C memory (the host's MPI), never into Go memory. */
%typemap(gotype) const void* mpi_comm "uintptr"
%typemap(in) const void* mpi_comm %{ $1 = ($1_ltype)$input; %}

%typemap(gotype) (const void* data, size_t size) "[]byte"
%typemap(in) (const void* data, size_t size) %{
  $1 = ($1_ltype)$input.array;
  $2 = ($2_ltype)$input.len;
%}

/* A new handle out: the address of a Go uintptr that receives the C pointer. */
%typemap(gotype) SWIGTYPE** out "*uintptr"
%typemap(in) SWIGTYPE** out %{ $1 = ($1_ltype)$input; %}

/* A library-owned string out, copied into Go memory before the call returns to Go (the string
 * lives only as long as its handle, which Go may free right after). */
%typemap(gotype) const char** out, const char** name "*string"
%typemap(in) const char** out (const char* value = NULL), const char** name (const char* value = NULL)
%{ $1 = $input ? ($1_ltype)&value : NULL; %}
%typemap(argout, fragment = "AllocateString") const char** out, const char** name
%{
  if ($input && value$argnum) *$input = Swig_AllocateString(value$argnum, strlen(value$argnum));
%}
%typemap(goargout, fragment = "CopyString") const char** out, const char** name
%{
  if $input != nil && *$input != "" {
    *$input = swigCopyString(*$input)
  }
%}

/* An optional directory: "" is NULL. */
%typemap(in) const char* external_dir %{
  $1 = NULL;
  if ($input.n > 0) {
    $1 = ($1_ltype)malloc($input.n + 1);
    memcpy($1, $input.p, $input.n);
    $1[$input.n] = '\0';
  }
%}

/* Link flags come from pkg-config: the installed moert.pc, or moert-uninstalled.pc in a build
 * tree (pkg-config prefers it when its directory is on PKG_CONFIG_PATH). */
%insert(cgo_comment_typedefs) %{
#cgo pkg-config: moert
%}

#endif /* SWIGGO */

/* ============================================================================================ */
#if defined(SWIGJAVA)

/* Header constants as compile-time Java constants in the public interface CapiConstants: they
 * are the values this binding was built against (MOERT_ABI_VERSION among them). */
%javaconst(1);
/* Except where the C literal is not Java (an unsigned suffix): that value comes from the C side
 * through JNI when CapiConstants initialises. */
%javaconst(0) MOERT_ALL_LAYERS;

/* The generated layer is package-private: the idiomatic classes of dev.moert are the API. */
%pragma(java) jniclassclassmodifiers = "final class"
%pragma(java) moduleclassmodifiers = "final class"
%typemap(javaclassmodifiers) SWIGTYPE* "final class"

/* 64-bit unsigned values travel as Java long bit patterns (SWIG's default is BigInteger). */
%apply int64_t { uint64_t };
%apply int64_t { size_t };

%{
#include <jni.h>

static void moert_jni_throw(JNIEnv* env, const char* cls, const char* msg) {
  jclass c = (*env)->FindClass(env, cls);
  if (c) (*env)->ThrowNew(env, c, msg);
}

/* A library string (UTF-8) as a Java byte[]; Java decodes it as UTF-8 (NewStringUTF takes
 * modified UTF-8 and would mangle characters outside the BMP). */
static jbyteArray moert_jni_bytes(JNIEnv* env, const char* s) {
  if (!s) return NULL;
  jsize n = (jsize)strlen(s);
  jbyteArray a = (*env)->NewByteArray(env, n);
  if (a) (*env)->SetByteArrayRegion(env, a, 0, n, (const jbyte*)s);
  return a;
}

/* Every copy an argument's `in` typemap makes is owned by a local with a cleanup function
 * (GCC's and clang's `cleanup` attribute, run whenever the local goes out of scope). SWIG's Java
 * wrappers return straight out of an `in` typemap that fails and run `freearg` only after the
 * call, so an argument refused after another had been copied (a read-only heap buffer after an
 * array-backed one, an out-of-memory string after a string) would otherwise leak the earlier
 * copies. */
#define MOERT_JNI_OWNED(fn) __attribute__((cleanup(fn)))

static void moert_jni_free_cstring(char** s) {
  free(*s);
  *s = NULL;
}

/* UTF-8 bytes from Java (a String encoded by Capi.cstring) as a malloc'ed C string. */
static char* moert_jni_cstring(JNIEnv* env, jbyteArray a, int* failed) {
  *failed = 0;
  if (!a) return NULL;
  jsize n = (*env)->GetArrayLength(env, a);
  char* s = (char*)malloc((size_t)n + 1);
  if (!s) {
    moert_jni_throw(env, "java/lang/OutOfMemoryError", "moert: string argument");
    *failed = 1;
    return NULL;
  }
  (*env)->GetByteArrayRegion(env, a, 0, n, (jbyte*)s);
  s[n] = '\0';
  return s;
}

/* One java.nio buffer seen from C: a direct buffer is used in place (zero copy) unless its
 * address is not aligned to the element size (a view of a direct ByteBuffer at an odd offset),
 * which is copied into aligned memory; an array-backed one is copied, only its window
 * [arrayOffset, arrayOffset + capacity), into native memory with Get<Type>ArrayRegion. After the
 * call an output's copy goes back with Set<Type>ArrayRegion, its window only and only when the
 * call succeeded: Get<Type>ArrayElements would copy the whole array out and back, undoing what
 * other threads wrote elsewhere in it meanwhile (several threads filling one result array, each
 * its own slice) and writing back even after a failure. The C length is the buffer's capacity,
 * so the library can never run past it; the idiomatic layer passes slice()d buffers whose index
 * 0 is the caller's position, in native byte order (it converts others). */
typedef struct {
  void* data;
  jlong length;
  jarray array;     /* an array-backed buffer's array, whose window `data` copies */
  jint first;       /* the window's first element in `array` */
  void* unaligned;  /* the caller's direct memory when `data` is an aligned copy of it */
  size_t bytes;
} moert_jni_buffer;

enum { MOERT_JNI_BYTE, MOERT_JNI_INT, MOERT_JNI_LONG, MOERT_JNI_FLOAT, MOERT_JNI_DOUBLE };

/* Copies between an array's window and native memory, either way. */
static void moert_jni_window(JNIEnv* env, const moert_jni_buffer* b, int type, int to_array) {
  const jsize n = (jsize)b->length;
  switch (type) {
    case MOERT_JNI_BYTE:
      if (to_array)
        (*env)->SetByteArrayRegion(env, (jbyteArray)b->array, b->first, n, (const jbyte*)b->data);
      else
        (*env)->GetByteArrayRegion(env, (jbyteArray)b->array, b->first, n, (jbyte*)b->data);
      break;
    case MOERT_JNI_INT:
      if (to_array)
        (*env)->SetIntArrayRegion(env, (jintArray)b->array, b->first, n, (const jint*)b->data);
      else
        (*env)->GetIntArrayRegion(env, (jintArray)b->array, b->first, n, (jint*)b->data);
      break;
    case MOERT_JNI_LONG:
      if (to_array)
        (*env)->SetLongArrayRegion(env, (jlongArray)b->array, b->first, n, (const jlong*)b->data);
      else
        (*env)->GetLongArrayRegion(env, (jlongArray)b->array, b->first, n, (jlong*)b->data);
      break;
    case MOERT_JNI_DOUBLE:
      if (to_array)
        (*env)->SetDoubleArrayRegion(env, (jdoubleArray)b->array, b->first, n,
                                     (const jdouble*)b->data);
      else
        (*env)->GetDoubleArrayRegion(env, (jdoubleArray)b->array, b->first, n, (jdouble*)b->data);
      break;
    default:
      if (to_array)
        (*env)->SetFloatArrayRegion(env, (jfloatArray)b->array, b->first, n,
                                    (const jfloat*)b->data);
      else
        (*env)->GetFloatArrayRegion(env, (jfloatArray)b->array, b->first, n, (jfloat*)b->data);
      break;
  }
}

static int moert_jni_buffer_get(JNIEnv* env, jobject buffer, int type, moert_jni_buffer* b) {
  static const size_t width[] = {1, 4, 8, 4, 8};
  memset(b, 0, sizeof *b);
  if (!buffer) return 1;
  void* address = (*env)->GetDirectBufferAddress(env, buffer);
  if (address) {
    b->data = address;
    b->length = (*env)->GetDirectBufferCapacity(env, buffer);
    if ((uintptr_t)address % width[type] != 0) {
      b->bytes = (size_t)b->length * width[type];
      b->data = malloc(b->bytes ? b->bytes : 1);
      if (!b->data) {
        moert_jni_throw(env, "java/lang/OutOfMemoryError", "moert: an unaligned buffer's copy");
        return 0;
      }
      memcpy(b->data, address, b->bytes);
      b->unaligned = address;
    }
    return 1;
  }
  jclass cls = (*env)->FindClass(env, "java/nio/Buffer");
  if (!cls) return 0;
  jmethodID has_array = (*env)->GetMethodID(env, cls, "hasArray", "()Z");
  jmethodID array = (*env)->GetMethodID(env, cls, "array", "()Ljava/lang/Object;");
  jmethodID offset = (*env)->GetMethodID(env, cls, "arrayOffset", "()I");
  jmethodID capacity = (*env)->GetMethodID(env, cls, "capacity", "()I");
  if (!has_array || !array || !offset || !capacity) return 0;
  /* Every call into Java is followed by an exception check before the next JNI call. */
  jboolean backed = (*env)->CallBooleanMethod(env, buffer, has_array);
  if ((*env)->ExceptionCheck(env)) return 0;
  if (!backed) {
    moert_jni_throw(env, "java/lang/IllegalArgumentException",
                    "moert: a buffer must be direct, or array-backed and writable");
    return 0;
  }
  jarray backing = (jarray)(*env)->CallObjectMethod(env, buffer, array);
  if ((*env)->ExceptionCheck(env)) return 0;
  b->first = (*env)->CallIntMethod(env, buffer, offset);
  if ((*env)->ExceptionCheck(env)) return 0;
  b->length = (*env)->CallIntMethod(env, buffer, capacity);
  if ((*env)->ExceptionCheck(env)) return 0;
  b->bytes = (size_t)b->length * width[type];
  b->data = malloc(b->bytes ? b->bytes : 1);
  if (!b->data) {
    moert_jni_throw(env, "java/lang/OutOfMemoryError", "moert: an array-backed buffer's copy");
    return 0;
  }
  b->array = backing;
  moert_jni_window(env, b, type, 0);
  if ((*env)->ExceptionCheck(env)) {
    free(b->data);
    b->data = NULL;
    b->array = NULL;
    return 0;
  }
  return 1;
}

/* `copy_back`: an output of a call that succeeded. Releasing twice is harmless. */
static void moert_jni_buffer_release(JNIEnv* env, moert_jni_buffer* b, int type, int copy_back) {
  if (b->unaligned) {
    if (copy_back) memcpy(b->unaligned, b->data, b->bytes);
    free(b->data);
    b->data = NULL;
    b->unaligned = NULL;
    return;
  }
  if (!b->array) return;
  if (copy_back) moert_jni_window(env, b, type, 1);
  free(b->data);
  b->data = NULL;
  b->array = NULL;
}

/* The cleanup of a buffer's local: frees a copy that `freearg` did not reach (no copy-back, so no
 * JNI call, which an exception pending at that point would forbid). */
static void moert_jni_buffer_drop(moert_jni_buffer* b) {
  moert_jni_buffer_release(NULL, b, MOERT_JNI_BYTE, 0);
}
%}

/* Strings in: Java String -> UTF-8 bytes (Capi.cstring) -> C string; null is NULL. */
%typemap(jni) const char* "jbyteArray"
%typemap(jtype) const char* "byte[]"
%typemap(jstype) const char* "String"
%typemap(javain) const char* "Capi.cstring($javainput)"
%typemap(in) const char* (int failed) %{
  char* cstring$argnum MOERT_JNI_OWNED(moert_jni_free_cstring) =
      moert_jni_cstring(jenv, $input, &failed);
  if (failed) return $null;
  $1 = cstring$argnum;
%}
/* Empty, so that SWIG's default (ReleaseStringUTFChars) does not apply: the local above frees. */
%typemap(freearg) const char* ""

/* Strings out (static or library-owned): byte[] decoded as UTF-8 by Capi.string. */
%typemap(out) const char* %{ $result = moert_jni_bytes(jenv, $1); %}
%typemap(javaout) const char* { return Capi.string($jnicall); }

/* A library-owned string out through const char**: a one-element String[] (null: NULL). */
%typemap(jni) const char** out, const char** name "jobjectArray"
%typemap(jtype) const char** out, const char** name "byte[][]"
%typemap(jstype) const char** out, const char** name "String[]"
%typemap(javain, pre = "    byte[][] bytes$javainput = $javainput == null ? null : new byte[1][];",
         post = "      if ($javainput != null) $javainput[0] = Capi.string(bytes$javainput[0]);")
    const char** out, const char** name "bytes$javainput"
%typemap(in) const char** out (const char* value = NULL), const char** name (const char* value = NULL)
%{ $1 = $input ? ($1_ltype)&value : NULL; %}
%typemap(argout) const char** out, const char** name %{
  if ($input && value$argnum) {
    jbyteArray bytes = moert_jni_bytes(jenv, value$argnum);
    if (bytes) (*jenv)->SetObjectArrayElement(jenv, $input, 0, bytes);
  }
%}

/* One scalar out: a Java array of at least one element (null: NULL), written after the call. */
%define MOERT_JAVA_SCALAR_OUT(CTYPE, JNITYPE, JTYPE, JARRAY, JSET, JGET)
%typemap(jni) CTYPE* #JARRAY
%typemap(jtype) CTYPE* #JTYPE "[]"
%typemap(jstype) CTYPE* #JTYPE "[]"
%typemap(javain) CTYPE* "$javainput"
/* The C function starts from the array's element: one it does not write (moert_session_step's
 * figures for a step refused before any change) keeps the caller's value, as in C. */
%typemap(in) CTYPE* (CTYPE value = 0) %{
  $1 = NULL;
  if ($input) {
    if ((*jenv)->GetArrayLength(jenv, $input) < 1) {
      moert_jni_throw(jenv, "java/lang/IllegalArgumentException", "moert: empty output array");
      return $null;
    }
    JNITYPE initial = 0;
    (*jenv)->JGET(jenv, $input, 0, 1, &initial);
    value = (CTYPE)initial;
    $1 = &value;
  }
%}
%typemap(argout) CTYPE* %{
  if ($input) {
    JNITYPE v = (JNITYPE)value$argnum;
    (*jenv)->JSET(jenv, $input, 0, 1, &v);
  }
%}
%enddef
MOERT_JAVA_SCALAR_OUT(int32_t, jint, int, jintArray, SetIntArrayRegion, GetIntArrayRegion)
MOERT_JAVA_SCALAR_OUT(uint32_t, jint, int, jintArray, SetIntArrayRegion, GetIntArrayRegion)
MOERT_JAVA_SCALAR_OUT(int64_t, jlong, long, jlongArray, SetLongArrayRegion, GetLongArrayRegion)
MOERT_JAVA_SCALAR_OUT(uint64_t, jlong, long, jlongArray, SetLongArrayRegion, GetLongArrayRegion)
MOERT_JAVA_SCALAR_OUT(double, jdouble, double, jdoubleArray, SetDoubleArrayRegion, GetDoubleArrayRegion)

/* Arrays: java.nio buffers (see moert_jni_buffer above), their capacity as the C length. The
 * buffer state is declared in the code, not as a typemap local: SWIG attaches the locals of a
 * list of multi-argument patterns to the last pattern only. */
%define MOERT_JAVA_ARRAYS(CTYPE, BUFFER, TAG)
%typemap(jni) MOERT_IN_ARRAYS(CTYPE), MOERT_OUT_ARRAYS(CTYPE) "jobject"
%typemap(jtype) MOERT_IN_ARRAYS(CTYPE), MOERT_OUT_ARRAYS(CTYPE) #BUFFER
%typemap(jstype) MOERT_IN_ARRAYS(CTYPE), MOERT_OUT_ARRAYS(CTYPE) #BUFFER
%typemap(javain) MOERT_IN_ARRAYS(CTYPE), MOERT_OUT_ARRAYS(CTYPE) "$javainput"
%typemap(in) MOERT_IN_ARRAYS(CTYPE), MOERT_OUT_ARRAYS(CTYPE) %{
  moert_jni_buffer buffer$argnum MOERT_JNI_OWNED(moert_jni_buffer_drop);
  if (!moert_jni_buffer_get(jenv, $input, TAG, &buffer$argnum)) return $null;
  $1 = ($1_ltype)buffer$argnum.data;
  $2 = ($2_ltype)buffer$argnum.length;
%}
/* Nothing to copy after the call (the release below does it); this also keeps the scalar-out
 * argout typemaps, which match T* alone, off these pointers. */
%typemap(argout) MOERT_IN_ARRAYS(CTYPE), MOERT_OUT_ARRAYS(CTYPE) ""
%typemap(freearg) MOERT_IN_ARRAYS(CTYPE) %{ moert_jni_buffer_release(jenv, &buffer$argnum, TAG, 0); %}
/* Every function that takes an output array returns a moert_status*, NULL on success. */
%typemap(freearg) MOERT_OUT_ARRAYS(CTYPE)
%{ moert_jni_buffer_release(jenv, &buffer$argnum, TAG, result == NULL); %}
%enddef
MOERT_JAVA_ARRAYS(float, java.nio.FloatBuffer, MOERT_JNI_FLOAT)
MOERT_JAVA_ARRAYS(int32_t, java.nio.IntBuffer, MOERT_JNI_INT)
MOERT_JAVA_ARRAYS(int64_t, java.nio.LongBuffer, MOERT_JNI_LONG)
MOERT_JAVA_ARRAYS(uint8_t, java.nio.ByteBuffer, MOERT_JNI_BYTE)
MOERT_JAVA_ARRAYS(double, java.nio.DoubleBuffer, MOERT_JNI_DOUBLE)

/* The address of the host's MPI_Comm (moert_comm_create_mpi) as a Java long; 0 is NULL. */
%typemap(jni) const void* mpi_comm "jlong"
%typemap(jtype) const void* mpi_comm "long"
%typemap(jstype) const void* mpi_comm "long"
%typemap(javain) const void* mpi_comm "$javainput"
%typemap(in) const void* mpi_comm %{ $1 = ($1_ltype)(intptr_t)$input; %}

%typemap(jni) (const void* data, size_t size) "jobject"
%typemap(jtype) (const void* data, size_t size) "java.nio.ByteBuffer"
%typemap(jstype) (const void* data, size_t size) "java.nio.ByteBuffer"
%typemap(javain) (const void* data, size_t size) "$javainput"
%typemap(in) (const void* data, size_t size) %{
  moert_jni_buffer buffer$argnum MOERT_JNI_OWNED(moert_jni_buffer_drop);
  if (!moert_jni_buffer_get(jenv, $input, MOERT_JNI_BYTE, &buffer$argnum)) return $null;
  $1 = ($1_ltype)buffer$argnum.data;
  $2 = ($2_ltype)buffer$argnum.length;
%}
%typemap(freearg) (const void* data, size_t size)
%{ moert_jni_buffer_release(jenv, &buffer$argnum, MOERT_JNI_BYTE, 0); %}

/* A new handle out: a one-element array of the handle's proxy class; null stays null. */
%typemap(jni) SWIGTYPE** out "jlongArray"
%typemap(jtype) SWIGTYPE** out "long[]"
%typemap(jstype) SWIGTYPE** out "$*javaclassname[]"
%typemap(javain, pre = "    long[] ptr$javainput = new long[1];",
         post = "      if (ptr$javainput[0] != 0) $javainput[0] = new $*javaclassname(ptr$javainput[0], false);")
    SWIGTYPE** out "ptr$javainput"
%typemap(in) SWIGTYPE** out ($*1_ltype handle = NULL) %{ $1 = &handle; %}
%typemap(argout) SWIGTYPE** out %{
  {
    jlong p = (jlong)(intptr_t)handle$argnum;
    (*jenv)->SetLongArrayRegion(jenv, $input, 0, 1, &p);
  }
%}

/* Submitted batcher requests: a Java object (the idiomatic layer's pending request) rides as
 * `user_data`, a JNI global reference, and the C callback below is `done`. The callback runs on a
 * batcher thread (or on the thread freeing the batcher): it attaches that thread to the JVM once,
 * as a daemon named "moert-batcher" (detached by a thread-local destructor when the thread
 * exits), copies the answer into Java arrays, calls the object's
 * `void complete(int code, byte[] message, float[] out, long[] stats)` (message: UTF-8, null on
 * success; out: null on error, or when it could not be copied), clears any exception it left, and
 * deletes the global reference. A submit that fails deletes it at once: the callback never runs. */
%{
#include <pthread.h>

static JavaVM* moert_jni_vm;
static pthread_key_t moert_jni_detach_key;
static int moert_jni_detach_key_ok;
static pthread_once_t moert_jni_detach_once = PTHREAD_ONCE_INIT;

/* Runs when a thread this file attached exits. */
static void moert_jni_detach(void* vm) { (*(JavaVM*)vm)->DetachCurrentThread((JavaVM*)vm); }

static void moert_jni_detach_init(void) {
  moert_jni_detach_key_ok = pthread_key_create(&moert_jni_detach_key, moert_jni_detach) == 0;
}

/* Exceptions are cleared, not thrown: nothing may unwind into the library's thread. */
static int moert_jni_failed(JNIEnv* env) {
  if (!(*env)->ExceptionCheck(env)) return 0;
  (*env)->ExceptionClear(env);
  return 1;
}

static void moert_jni_batcher_done(void* user_data, moert_status* status, const float* out,
                                   uint64_t out_len, const int64_t* stats, uint64_t stats_len) {
  JavaVM* vm = __atomic_load_n(&moert_jni_vm, __ATOMIC_ACQUIRE);
  JNIEnv* env = NULL;
  int attached = 0;
  if (!vm) {
    moert_status_free(status);
    return;
  }
  if ((*vm)->GetEnv(vm, (void**)&env, JNI_VERSION_1_6) == JNI_EDETACHED) {
    JavaVMAttachArgs args = {JNI_VERSION_1_6, (char*)"moert-batcher", NULL};
    if ((*vm)->AttachCurrentThreadAsDaemon(vm, (void**)&env, &args) != JNI_OK) env = NULL;
    attached = env != NULL;
  }
  if (!env) {
    moert_status_free(status); /* no JVM to answer: it is shutting down */
    return;
  }
  jobject token = (jobject)user_data;
  if (token && (*env)->PushLocalFrame(env, 8) == 0) {
    jint code = moert_status_code(status);
    jbyteArray message = status ? moert_jni_bytes(env, moert_status_message(status)) : NULL;
    if (moert_jni_failed(env)) message = NULL;
    jfloatArray values = NULL;
    if (!status && out && out_len <= 0x7fffffff) {
      values = (*env)->NewFloatArray(env, (jsize)out_len);
      if (values) (*env)->SetFloatArrayRegion(env, values, 0, (jsize)out_len, out);
      if (moert_jni_failed(env)) values = NULL;
    }
    jlongArray figures = NULL;
    if (stats && stats_len <= 0x7fffffff) {
      figures = (*env)->NewLongArray(env, (jsize)stats_len);
      if (figures)
        (*env)->SetLongArrayRegion(env, figures, 0, (jsize)stats_len, (const jlong*)stats);
      if (moert_jni_failed(env)) figures = NULL;
    }
    jclass cls = (*env)->GetObjectClass(env, token);
    jmethodID complete = cls ? (*env)->GetMethodID(env, cls, "complete", "(I[B[F[J)V") : NULL;
    if (!moert_jni_failed(env) && complete) {
      (*env)->CallVoidMethod(env, token, complete, code, message, values, figures);
      moert_jni_failed(env);
    }
    (*env)->PopLocalFrame(env, NULL);
  }
  moert_jni_failed(env);
  if (token) (*env)->DeleteGlobalRef(env, token);
  moert_status_free(status);
  if (attached) {
    pthread_once(&moert_jni_detach_once, moert_jni_detach_init);
    if (!moert_jni_detach_key_ok || pthread_setspecific(moert_jni_detach_key, vm) != 0)
      (*vm)->DetachCurrentThread(vm);
  }
}
%}

%typemap(in, numinputs = 0) moert_batcher_callback done %{ $1 = moert_jni_batcher_done; %}
/* user_data's typemap below could not make its reference and left an OutOfMemoryError pending:
 * the library is then called without a callback, which it refuses without queuing anything, so
 * that the arguments converted before it (a pinned array) are still released after the call. */
%typemap(check) moert_batcher_callback done %{
  if ((*jenv)->ExceptionCheck(jenv)) $1 = NULL;
%}

%typemap(jni) void* user_data "jobject"
%typemap(jtype) void* user_data "Object"
%typemap(jstype) void* user_data "Object"
%typemap(javain) void* user_data "$javainput"
%typemap(in) void* user_data %{
  $1 = NULL;
  if ($input) {
    JavaVM* vm = NULL;
    if (!__atomic_load_n(&moert_jni_vm, __ATOMIC_ACQUIRE) && (*jenv)->GetJavaVM(jenv, &vm) == 0)
      __atomic_store_n(&moert_jni_vm, vm, __ATOMIC_RELEASE);
    $1 = (*jenv)->NewGlobalRef(jenv, $input);
    /* No return here: see the check typemap of `done`. */
    if (!$1) moert_jni_throw(jenv, "java/lang/OutOfMemoryError", "moert: a request's reference");
  }
%}
/* The library returned an error: `done` will never run, so the reference goes now. With the
 * OutOfMemoryError pending, Java never sees the returned status: it goes too. */
%typemap(argout) void* user_data %{
  if (result && $1) (*jenv)->DeleteGlobalRef(jenv, (jobject)$1);
  if (result && (*jenv)->ExceptionCheck(jenv)) {
    moert_status_free(result);
    $result = 0;
  }
%}

/* String helpers the typemaps above call. */
%pragma(java) modulecode = %{
  /** UTF-8 bytes of s (the C side adds the terminating NUL), or null. */
  static byte[] cstring(String s) {
    if (s == null) {
      return null;
    }
    byte[] utf8 = s.getBytes(java.nio.charset.StandardCharsets.UTF_8);
    for (byte b : utf8) {
      if (b == 0) {
        throw new MoertException(
            CapiConstants.MOERT_ERR_INVALID_ARGUMENT, "a string argument contains a NUL character");
      }
    }
    return utf8;
  }

  /** A library string: UTF-8 bytes as a String, or null. */
  static String string(byte[] utf8) {
    return utf8 == null ? null : new String(utf8, java.nio.charset.StandardCharsets.UTF_8);
  }
%}

#endif /* SWIGJAVA */

%include "moert/moert.h"
