#include "api/save_state.h"

#include "flashckpt/checkpointer.h"

namespace flashckpt {

int64_t SaveHandle::step() const { return state_ ? state_->step() : -1; }
void SaveHandle::wait_snapshot() const { if (state_) state_->WaitSnapshot(); }
void SaveHandle::wait_durable() const {
  if (state_ && !state_->WaitDurableFor(state_->timeout(), true))
    throw Error(ErrorCode::kDeadlineExceeded,
                absl::StrCat("step ", state_->step(), " not durable after ", state_->timeout().count() / 1000.0,
                             " s (still queued or persisting: is the disk or another rank stuck? "
                             "CheckpointerOptions.wait_timeout sets this deadline)"));
}
bool SaveHandle::wait_durable_for(std::chrono::milliseconds t) const {
  return !state_ || state_->WaitDurableFor(t, true);
}
bool SaveHandle::persisted() const { return state_ && state_->persisted(); }

}  // namespace flashckpt
