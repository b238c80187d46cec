// osengine: int8 / int4 GEMMs with fused OS+ shift-add epilogues and activation quantization.
#pragma once
#include "osengine/backend.hpp"
#include "osengine/errors.hpp"
#include "osengine/gemm.hpp"
#include "osengine/hadamard.hpp"
#include "osengine/int4.hpp"
#include "osengine/packed_weights.hpp"
#include "osengine/quantize.hpp"
#include "osengine/tensor.hpp"
#include "osengine/version.hpp"
