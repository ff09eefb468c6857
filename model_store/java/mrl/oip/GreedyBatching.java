package mrl.oip;

import java.util.concurrent.LinkedBlockingDeque;
import java.util.concurrent.TimeUnit;

/**
 * Greedy batching for TorchServe 0.12: a worker takes what is queued, up to the batch size, and
 * never waits for more.
 *
 * <p>TorchServe's worker polls its model's queue for the first request of a batch (blocking), then
 * for up to batchSize - 1 more, each poll waiting what is left of maxBatchDelay. So a lone request
 * always waits maxBatchDelay, and maxBatchDelay cannot be 0: an archive's 0 is read as "unset", 100
 * ms (ModelManager), and a 0 given to the register API ends every batch after its second request
 * (Model.pollInferJob breaks once the delay left is 0; measured: 16 clients, mean batch 2.0). Under
 * load the queue is never empty when a batch is taken, so the wait only ever delays requests that
 * arrive alone. This is what Triton does by default (max_queue_delay_microseconds 0).
 *
 * <p>The agent rewrites, as the JVM loads org.pytorch.serve.wlm.Model, its calls of
 * LinkedBlockingDeque.poll(long, TimeUnit) into calls of {@link #poll} here ({@link Calls}).
 * Started with -Dmrl.batching=greedy (config.properties); without it the agent leaves Model as it is.
 */
public final class GreedyBatching {
    static final String TARGET = "org/pytorch/serve/wlm/Model";
    /** TorchServe 0.12.0's Model polls its queues in exactly this many places (javap). */
    static final int SITES = 6;

    private static final String DEQUE = "java/util/concurrent/LinkedBlockingDeque";
    private static final String POLL_DESC = "(JLjava/util/concurrent/TimeUnit;)Ljava/lang/Object;";
    private static final String HELPER = "mrl/oip/GreedyBatching";
    private static final String HELPER_DESC =
            "(Ljava/util/concurrent/LinkedBlockingDeque;JLjava/util/concurrent/TimeUnit;)Ljava/lang/Object;";

    private GreedyBatching() {}

    /**
     * What the rewritten calls run: a wait for ever (the first request of a batch) stays one;
     * any other poll takes the head of the queue, or nothing, at once.
     */
    public static <E> E poll(LinkedBlockingDeque<E> queue, long timeout, TimeUnit unit)
            throws InterruptedException {
        return timeout == Long.MAX_VALUE ? queue.poll(timeout, unit) : queue.poll();
    }

    /** Model's class file with its queue polls sent to {@link #poll}; IllegalStateException if it
     * does not hold exactly {@link #SITES} of them (another TorchServe: leave it unpatched). */
    static byte[] patch(byte[] klass) {
        return Calls.redirect(klass, TARGET, DEQUE, "poll", POLL_DESC, Calls.INVOKEVIRTUAL, SITES,
                HELPER, "poll", HELPER_DESC);
    }
}
