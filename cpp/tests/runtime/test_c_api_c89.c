/* c_api.h compiled as C89 (-std=c89 -pedantic-errors, see cpp/tests/CMakeLists.txt) and called from C: the header
 * must stay usable from the oldest C that FFI generators and embedded toolchains speak. */
#include <string.h>

#include "osengine/runtime/c_api.h"

/* 0 when the calls behave from C as they do from C++; else the number of the failed check. */
int osengine_c89_smoke(void) {
  osengine_model* model = NULL;
  osengine_sampler* sampler = NULL;
  osengine_status status;
  size_t prefix = 0;
  int32_t token = -1;
  float logits[3];
  logits[0] = 0.5f;
  logits[1] = 0.25f;
  logits[2] = 2.0f;

  status = osengine_model_load(NULL, &model);
  if (status != OSENGINE_INVALID_ARGUMENT || model != NULL) return 1;
  if (strstr(osengine_last_error(), "'dir'") == NULL) return 2;
  if (osengine_sampler_create(0.0f, 0, 1.0f, 0, &sampler) != OSENGINE_OK) return 3;
  if (osengine_last_error()[0] != '\0') return 4;
  if (osengine_sampler_sample(sampler, logits, 3, &token) != OSENGINE_OK || token != 2) return 5;
  osengine_sampler_free(sampler);
  if (osengine_utf8_complete_prefix("a\xe2\x82", 3, &prefix) != OSENGINE_OK || prefix != 1) return 6;
  osengine_model_free(NULL);
  return 0;
}
