/* Example 03: example 02 in plain C (C99) through the C API (osengine/runtime/c_api.h): load a quantized folder and
 * its tokenizer.json, tokenize the prompt, generate greedily and stream the text to stdout (followed by a newline;
 * the end-of-sequence token ends it and is not written).
 *
 *   c_generate MODEL_DIR [--prompt TEXT] [--max-new-tokens N] [--threads N]
 *
 * Every call returns a status; on failure osengine_last_error() says what went wrong (the argument, or the file and
 * the problem). */
#define _POSIX_C_SOURCE 199309L /* clock_gettime */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "osengine/runtime/c_api.h"

/* The streaming state handed to the token callback. */
typedef struct {
  const osengine_tokenizer* tokenizer;
  int32_t eos;
  char pending[256]; /* bytes that do not end a UTF-8 character yet (at most 3) + the next piece */
  size_t n_pending;
  osengine_status status; /* a failure inside the callback */
} stream;

/* Writes the token's bytes up to the last complete UTF-8 character; returns nonzero to stop. */
static int on_token(int32_t token, void* user) {
  stream* s = (stream*)user;
  size_t len = 0, complete = 0;
  if (token == s->eos) return 1;
  s->status = osengine_tokenizer_token_to_piece(s->tokenizer, token, s->pending + s->n_pending,
                                                sizeof s->pending - s->n_pending, &len);
  if (s->status != OSENGINE_OK) return 1; /* e.g. a piece longer than the buffer: stop, main reports it */
  s->n_pending += len;
  osengine_utf8_complete_prefix(s->pending, s->n_pending, &complete);
  fwrite(s->pending, 1, complete, stdout);
  fflush(stdout);
  memmove(s->pending, s->pending + complete, s->n_pending - complete);
  s->n_pending -= complete;
  return 0;
}

static int fail(const char* what) {
  fprintf(stderr, "c_generate: error: %s: %s\n", what, osengine_last_error());
  return 1;
}

/* A bad command line: `message`, then the argument it is about (when not NULL). */
static int usage(const char* message, const char* argument) {
  fprintf(stderr, "c_generate: error: %s%s%s%s\n", message, argument ? " '" : "", argument ? argument : "",
          argument ? "'" : "");
  fprintf(stderr, "usage: c_generate MODEL_DIR [--prompt TEXT] [--max-new-tokens N] [--threads N]\n");
  return 1;
}

/* A decimal integer in [0, max], else -1. */
static long parse_count(const char* text, long max) {
  char* end = NULL;
  long value = strtol(text, &end, 10);
  return (end == text || *end != '\0' || value < 0 || value > max) ? -1 : value;
}

int main(int argc, char** argv) {
  const char* dir = NULL;
  const char* prompt = "Once upon a time";
  long max_new_tokens = 64, threads = 0;
  osengine_model* model = NULL;
  osengine_tokenizer* tokenizer = NULL;
  osengine_context* context = NULL;
  osengine_sampler* sampler = NULL;
  int32_t* ids = NULL;
  size_t n_ids = 0;
  int32_t n_generated = 0;
  stream s;
  int rc = 1, i;
  struct timespec start, end;
  double seconds;

  for (i = 1; i < argc; ++i) {
    if (strncmp(argv[i], "--", 2) != 0) {
      if (dir != NULL) return usage("more than one MODEL_DIR, also", argv[i]);
      dir = argv[i];
    } else if (i + 1 >= argc) {
      return usage("no value given to", argv[i]);
    } else if (strcmp(argv[i], "--prompt") == 0) {
      prompt = argv[++i];
    } else if (strcmp(argv[i], "--max-new-tokens") == 0) {
      max_new_tokens = parse_count(argv[++i], 1L << 20);
      if (max_new_tokens < 0) return usage("--max-new-tokens expects an integer in [0, 1048576], got", argv[i]);
    } else if (strcmp(argv[i], "--threads") == 0) {
      threads = parse_count(argv[++i], 1024);
      if (threads < 0) return usage("--threads expects an integer in [0, 1024], got", argv[i]);
    } else {
      return usage("unknown option", argv[i]);
    }
  }
  if (dir == NULL) return usage("MODEL_DIR is missing", NULL);

  if (osengine_model_load(dir, &model) != OSENGINE_OK) return fail("loading the model");
  if (osengine_tokenizer_load(dir, &tokenizer) != OSENGINE_OK) {
    rc = fail("loading the tokenizer");
    goto done;
  }
  /* two calls: the number of ids, then the ids */
  if (osengine_tokenizer_encode(tokenizer, prompt, strlen(prompt), 1, NULL, 0, &n_ids) != OSENGINE_OK) {
    rc = fail("tokenizing the prompt");
    goto done;
  }
  if (n_ids == 0) {
    fprintf(stderr, "c_generate: error: --prompt gives no tokens\n");
    goto done;
  }
  ids = (int32_t*)malloc(n_ids * sizeof *ids);
  if (ids == NULL) {
    fprintf(stderr, "c_generate: error: out of memory\n");
    goto done;
  }
  if (osengine_tokenizer_encode(tokenizer, prompt, strlen(prompt), 1, ids, n_ids, &n_ids) != OSENGINE_OK) {
    rc = fail("tokenizing the prompt");
    goto done;
  }
  /* the KV cache holds exactly the prompt and the new tokens; n_batch 512; greedy sampling */
  if (osengine_context_create(model, (int32_t)(n_ids + (size_t)max_new_tokens), 512, (int32_t)threads, &context) !=
      OSENGINE_OK) {
    rc = fail("creating the context");
    goto done;
  }
  if (osengine_sampler_create(0.0f, 0, 1.0f, 0, &sampler) != OSENGINE_OK) {
    rc = fail("creating the sampler");
    goto done;
  }
  s.tokenizer = tokenizer;
  s.n_pending = 0;
  s.status = OSENGINE_OK;
  osengine_model_eos_token(model, &s.eos);

  clock_gettime(CLOCK_MONOTONIC, &start);
  if (osengine_generate(context, ids, n_ids, (int32_t)max_new_tokens, sampler, on_token, &s, &n_generated) !=
      OSENGINE_OK) {
    rc = fail("generating");
    goto done;
  }
  if (s.status != OSENGINE_OK) {
    rc = fail("streaming a token");
    goto done;
  }
  clock_gettime(CLOCK_MONOTONIC, &end);
  seconds = (double)(end.tv_sec - start.tv_sec) + 1e-9 * (double)(end.tv_nsec - start.tv_nsec);
  if (s.n_pending > 0) fputs("\xEF\xBF\xBD", stdout); /* an incomplete character at the end: U+FFFD */
  fputs("\n", stdout);
  fprintf(stderr, "%d prompt tokens, %d generated in %.3f s (%.1f tokens/s)\n", (int)n_ids, (int)n_generated,
          seconds, seconds > 0 ? (double)n_generated / seconds : 0.0);
  rc = 0;

done:
  free(ids);
  osengine_sampler_free(sampler);
  osengine_context_free(context);
  osengine_tokenizer_free(tokenizer);
  osengine_model_free(model);
  return rc;
}
