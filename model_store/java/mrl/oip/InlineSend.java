package mrl.oip;

import java.util.concurrent.CompletableFuture;

/**
 * A batch sent to its worker from the thread that took it, not from a thread made for it.
 *
 * <p>TorchServe 0.12's WorkerThread hands each batch's write to its worker's channel to
 * CompletableFuture.runAsync, which runs it on ForkJoinPool's common pool, or, where that pool has
 * fewer than two threads (a machine of two cores or fewer: its parallelism is the cores less one),
 * on a new thread started for that one write. The WorkerThread never joins the future (its
 * stream of joins is never consumed); it goes on to wait for the worker's reply. Each batch thus
 * paid a thread's start and a hand-off before Netty's event loop took the write.
 *
 * <p>The agent rewrites, as the JVM loads org.pytorch.serve.wlm.WorkerThread, its one call of
 * CompletableFuture.runAsync(Runnable) into a call of {@link #runAsync} here ({@link Calls}),
 * which runs the write on the calling thread and returns its outcome as a finished future: a
 * failure lands in the future as before, unseen as before. TorchServe's task waits for the write
 * to complete (Netty's event loop does it) and catches an interrupt while it waits; run here,
 * that interrupt no longer reaches the WorkerThread's wait for the reply, which then ends at the
 * response timeout (a scale-down during that wait of microseconds). Started with
 * -Dmrl.send=inline (config.properties); without it the agent leaves WorkerThread as it is.
 */
public final class InlineSend {
    static final String TARGET = "org/pytorch/serve/wlm/WorkerThread";
    /** TorchServe 0.12.0's WorkerThread calls runAsync in exactly this many places (javap). */
    static final int SITES = 1;

    private static final String FUTURE = "java/util/concurrent/CompletableFuture";
    private static final String DESC = "(Ljava/lang/Runnable;)Ljava/util/concurrent/CompletableFuture;";

    private InlineSend() {}

    /** What the rewritten call runs: the task, here and now. */
    public static CompletableFuture<Void> runAsync(Runnable task) {
        try {
            task.run();
            return CompletableFuture.completedFuture(null);
        } catch (Throwable t) { // as runAsync would: the failure in the future, not thrown
            CompletableFuture<Void> failed = new CompletableFuture<>();
            failed.completeExceptionally(t);
            return failed;
        }
    }

    /** WorkerThread's class file with its runAsync call sent to {@link #runAsync}; IllegalStateException
     * if it does not hold exactly {@link #SITES} of them (another TorchServe: leave it unpatched). */
    static byte[] patch(byte[] klass) {
        return Calls.redirect(klass, TARGET, FUTURE, "runAsync", DESC, Calls.INVOKESTATIC, SITES,
                "mrl/oip/InlineSend", "runAsync", DESC);
    }
}
